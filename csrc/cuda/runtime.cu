// CUDA runtime queries for genkernels.info() and device checks. The runtime is linked
// statically, so these calls work (and report why) on a machine without a driver.
#include <cuda_runtime.h>
#include <cstdio>
#include "cuda/launchers.h"

namespace gk::cuda {

int device_count(char* why, int why_len) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    std::snprintf(why, why_len, "%s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
    cudaGetLastError();  // clear the sticky error so later calls report their own
    return -1;
  }
  if (n == 0) std::snprintf(why, why_len, "no CUDA device");
  return n;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace gk::cuda
