// Prepended to every kernel body on CUDA: the same thread ids as ids_metal.h.
const int dhsa_tid = int(threadIdx.x);
const int dhsa_lane = int(threadIdx.x) & 31;
const int dhsa_warp = int(threadIdx.x) >> 5;
const int dhsa_gx = int(blockIdx.x);
const int dhsa_gy = int(blockIdx.y);
const int dhsa_gz = int(blockIdx.z);
