// ThreadSanitizer check of the emulator's threads mode: a tile transpose through shared memory.
// Correct as written; with -DGK_DROP_BARRIER its __syncthreads() is removed, so threads read
// tiles other threads write without synchronization, and TSan must report a data race.
//
// Build: g++ -std=c++17 -O1 -g -fsanitize=thread -DGK_EMU_THREADS -I csrc \
//            tests/emu/tsan_barrier_test.cpp -o t [-DGK_DROP_BARRIER]
#include <cstdio>
#include <vector>

#include "cuda/compat.cuh"

namespace {

constexpr int kTile = 8;

// Each 8x8 block transposes one 8x8 tile of a (kTile*gridDim.y) x (kTile*gridDim.x) matrix.
__global__ void transpose_tile_kernel(const float* in, float* out, int cols) {
  __shared__ float tile[kTile][kTile + 1];  // +1: no bank conflicts on the transposed read
  const int x = blockIdx.x * kTile + threadIdx.x, y = blockIdx.y * kTile + threadIdx.y;
  tile[threadIdx.y][threadIdx.x] = in[y * cols + x];
#if !defined(GK_DROP_BARRIER)
  __syncthreads();
#endif
  const int rows = gridDim.y * kTile;
  const int tx = blockIdx.y * kTile + threadIdx.x, ty = blockIdx.x * kTile + threadIdx.y;
  out[ty * rows + tx] = tile[threadIdx.x][threadIdx.y];
}

}  // namespace

int main() {
  const int rows = 2 * kTile, cols = kTile;  // 2 blocks of 64 threads
  std::vector<float> in(rows * cols), out(rows * cols, -1.f);
  for (int i = 0; i < rows * cols; ++i) in[i] = float(i);
  const int err = gk::emu::launch(transpose_tile_kernel, dim3(cols / kTile, rows / kTile), dim3(kTile, kTile), 0,
                                  in.data(), out.data(), cols);
  int bad = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) bad += out[c * rows + r] != in[r * cols + c];
  std::printf("%s transpose through shared memory: %d wrong elements\n", err == 0 && bad == 0 ? "PASS" : "FAIL", bad);
  return err == 0 && bad == 0 ? 0 : 1;
}
