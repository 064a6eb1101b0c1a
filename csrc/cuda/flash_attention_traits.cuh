// Compile-time configuration of the flash-attention forward kernel (csrc/cuda/flash_attention.cuh):
// one FlashTraits<T, kHeadDim> per instantiation of the table in
// python/genkernels/tools/instantiations.py. Every tile choice is here, with the reason.
#pragma once
#include <cstdint>

namespace gk {

template <class T, int kHeadDim>
struct FlashTraits {
  static_assert(sizeof(T) == 2, "tensor-core path: fp16 or bf16 elements (mma.m16n8k16 takes 16-bit A and B)");
  static_assert(kHeadDim % 16 == 0 && kHeadDim >= 16 && kHeadDim <= 256,
                "head_dim is the k dimension of Q.K^T (k-steps of 16) and the n dimension of P.V (pairs of "
                "8-wide n-tiles loaded by one ldmatrix.x4.trans)");

  // 4 warps, each owning a 16-row slab of Q (the m of one mma): a block covers 64 query rows.
  // 8 warps would not lower registers per thread (a warp's slab always holds 16 x head_dim
  // accumulators, head_dim / 2 floats per thread); it would only share each K/V tile among more
  // rows, at the price of twice the Q shared memory. With 4 warps every head dim fits the 99 KB
  // shared-memory limit of sm_86/sm_89 as well as sm_80/sm_90.
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  // Occupancy hint for ptxas: 1. Left to itself, ptxas aims at 3 blocks per SM (168 registers)
  // for head_dim 96 and then spills; occupancy is bounded by shared memory anyway (1-3 blocks).
  static constexpr int kMinBlocksPerSm = 1;

  // Keys per K/V tile. Registers per thread: O accumulators kHeadDim / 2 floats + scores
  // kBlockN / 2 floats (+ fragments and addresses). 64 keys up to head_dim 128 (<= 96 floats of
  // state); 32 for head_dim 256 so that its 128 accumulators + 16 scores stay clear of spilling.
  static constexpr int kBlockN = kHeadDim <= 128 ? 64 : 32;
  static_assert(kBlockN % 16 == 0, "P.V consumes the scores in k-steps of 16 keys");

  // Global -> shared copies: 16-byte cp.async chunks of 8 elements.
  static constexpr int kChunk = 16 / int(sizeof(T));
  static constexpr int kChunksPerRow = kHeadDim / kChunk;

  // Shared-memory rows are padded by one 16-byte chunk. ldmatrix reads 8 rows of 16 bytes per
  // phase at the same column: with a row stride of an odd number of 16-byte chunks (head_dim / 8
  // is even, + 1), the 8 rows land in 8 different 16-byte bank groups of the 128-byte bank line,
  // so Q, K (ldmatrix) and V (ldmatrix.trans) reads are conflict-free. The epilogue's 4-byte
  // stores (8 rows x 4 lanes) are conflict-free for the same reason. Padding rather than an XOR
  // swizzle keeps the addressing trivial, for a cost of 16 bytes per row (3-6 % of the tiles).
  static constexpr int kRowStride = kHeadDim + kChunk;
  static_assert((kRowStride / kChunk) % 2 == 1, "padded row stride must be an odd number of 16-byte chunks");

  // Double-buffered K and V: tile j + 1 is in flight (cp.async) while tile j is computed.
  static constexpr int kStages = 2;
  static constexpr int kQElems = kBlockM * kRowStride;
  static constexpr int kTileElems = kBlockN * kRowStride;  // one of K or V, one stage
  static constexpr int kSmemBytes = (kQElems + 2 * kStages * kTileElems) * int(sizeof(T));
  static_assert(kSmemBytes <= 99 * 1024, "must fit the opt-in shared memory of every sm_80+ GPU (99 KB on sm_86/89)");

  // Copies are spread evenly over the block (no tail iteration in the copy loops).
  static_assert((kBlockM * kChunksPerRow) % kThreads == 0, "Q tile copy must divide evenly among threads");
  static_assert((kBlockN * kChunksPerRow) % kThreads == 0, "K/V tile copy must divide evenly among threads");

  // MMA tiling of one warp: S (16 x kBlockN) = Q (16 x D) K^T, O (16 x D) += P (16 x kBlockN) V.
  static constexpr int kScoreTiles = kBlockN / 8;   // n-tiles of S, 4 floats each per thread
  static constexpr int kOutTiles = kHeadDim / 8;    // n-tiles of O, 4 floats each per thread
  static constexpr int kQKSteps = kHeadDim / 16;    // k-steps of Q.K^T
  // Unrolling all 16 k-steps of head_dim 256 lets the scheduler hoist Q/K fragment loads of
  // many steps at once, which spills next to the 128 accumulators: unroll 4 steps at a time.
  static constexpr int kQKUnroll = kQKSteps > 8 ? 4 : kQKSteps;
  static constexpr int kPVSteps = kBlockN / 16;     // k-steps of P.V
};

}  // namespace gk
