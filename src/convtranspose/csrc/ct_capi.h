// A C function table of the compiled kernel, for other extensions (the MLX primitive in
// mlx_ext/) that run it without Python: `convtranspose._native.c_api()` returns it in a
// capsule named CT_CAPI_NAME. The entries dispatch to the instruction set in use.
#pragma once
#include <cstdint>

#include "correlate_api.h"

#define CT_CAPI_NAME "convtranspose._native.CtCapi"
#define CT_CAPI_VERSION 1

struct CtCapi {
  int version;  // CT_CAPI_VERSION
  void (*correlate)(const CtJob*);
  // The CT_MODE_CHANNELS weight layout (see pack_columns in module.cpp): dst[chunk][tap]
  // [r][column] = src[table[tap * cols + col] + r * row_stride], columns zero past `cols`.
  void (*pack)(int itemsize, const void* src, const int64_t* table, int64_t taps,
               int64_t cols, int64_t rows, int64_t row_stride, int64_t padded, int64_t chunk,
               void* dst);
  int (*lanes)(int itemsize);
  int (*max_vectors)();
  // Runs body(ctx) on the caller and on up to threads - 1 pool threads at once (a shared
  // task: the body's correlate calls divide their rows through their cursors).
  void (*run_shared)(void (*body)(void*), void* ctx, int threads);
};
