// Stand-in for MLX's embedded device header (it ships inside libmlx, not as a file): just
// what a custom_kernel wrapper and our preludes rely on, so nvcc can compile them off-GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cstdint>

namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}  // namespace mlx::core::cu
