// The pair op's fused CPU kernel: every (row, slot, weight) pair of a step's scattered rows in one call.
//
// For each group g (one slot s, its pairs p = starts[g] .. starts[g+1]) and each layer slice i:
//
//     h[k]                 = (scale · weights[p]) · Σⱼ Aᵢ[s, k, j] · x[rows[p], j]      k < rᵢ
//     (rᵢ = ranks[g], or all of B̂ᵢ's rows when ranks[g] < 0)
//     y[rows[p], oᵢ + o]  += Σₖ h[k] · B̂ᵢ[g, k, o]                                    o < nᵢ
//
// Aᵢ is vLLM's stacked A ([S, 1, R, H] or [S, R, H]) read in place. B̂ᵢ = Bᵢ[slots]ᵀ is either gathered and
// transposed by the caller once for the step's slots ([G, R', nᵢ] float32, kept by its cache), or, with
// `b_in_place`, read from vLLM's stacked B ([S, 1, nᵢ, R] or [S, nᵢ, R]) and transposed here, group by group,
// into a buffer of nᵢ·r floats: no gather to allocate or cache when the step's slots change every step (a gate
// over a thousand experts). Each slot's blocks are read from memory once per step and stay in cache across its
// pairs. The weights are float32 or bfloat16 (widened to float32 as they are loaded); x, y and every sum are
// float32. With `round_h`, h is rounded to bfloat16 before the expand, as the torch layouts round it for a
// bfloat16 y. One thread (vLLM's CPU worker runs one torch thread); the sums run in 16 lanes, and a group's pairs
// four at a time, so that each weight is loaded once per four rows.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 4;  // pairs of one group computed together: each weight read once per block

// 16 floats: one AVX-512 register, two AVX ones; the compiler picks the machine's instructions.
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// 16 bfloat16 values widened to float32: a bfloat16 is the top half of a float32's bits.
typedef uint16_t Halves __attribute__((vector_size(kLanes * sizeof(uint16_t))));
typedef uint32_t Words __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline Lanes load(const c10::BFloat16* p) {
  Halves half;
  __builtin_memcpy(&half, p, sizeof(half));
  const Words bits = __builtin_convertvector(half, Words) << 16;
  Lanes v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store(float* p, Lanes v) { __builtin_memcpy(p, &v, sizeof(v)); }

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

// The sum of the 16 lanes, as a tree: halves, quarters, eighths, then the last pair (4 shuffles and 4 adds).
inline float total(Lanes v) {
  typedef int32_t Order __attribute__((vector_size(kLanes * sizeof(int32_t))));
  v += __builtin_shuffle(v, Order{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, Order{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, Order{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, Order{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// h[q·hs + k] = c[q] · Σⱼ A[k·as + j] · x_q[j], for the block's P pairs q and k < rank (rounded to bfloat16
// with `round_h`). Four rows of A at a time: each 16-lane load of x then serves four of them and each load of A
// the P pairs, 4·P multiply-adds for 4 + P loads.
template <int64_t P, typename W>
void shrink(float* h, int64_t hs, const W* a, int64_t as, const float* const* x, const float* c, int64_t rank,
            int64_t n, bool round_h) {
  constexpr int64_t kRows = 4;
  auto finish = [&](int64_t q, int64_t k, float sum) {
    const W* ak = a + k * as;
    int64_t j = n - n % kLanes;
    for (; j < n; ++j) sum += widen(ak[j]) * x[q][j];
    const float value = c[q] * sum;
    h[q * hs + k] = round_h ? static_cast<float>(c10::BFloat16(value)) : value;
  };
  int64_t k = 0;
  for (; k + kRows <= rank; k += kRows) {
    Lanes acc[P][kRows] = {};
    for (int64_t j = 0; j + kLanes <= n; j += kLanes) {
      Lanes xv[P];
      for (int64_t q = 0; q < P; ++q) xv[q] = load(x[q] + j);
      for (int64_t kk = 0; kk < kRows; ++kk) {
        const Lanes av = load(a + (k + kk) * as + j);
        for (int64_t q = 0; q < P; ++q) acc[q][kk] += av * xv[q];
      }
    }
    for (int64_t q = 0; q < P; ++q) {
      for (int64_t kk = 0; kk < kRows; ++kk) finish(q, k + kk, total(acc[q][kk]));
    }
  }
  for (; k < rank; ++k) {
    Lanes acc[P] = {};
    for (int64_t j = 0; j + kLanes <= n; j += kLanes) {
      const Lanes av = load(a + k * as + j);
      for (int64_t q = 0; q < P; ++q) acc[q] += av * load(x[q] + j);
    }
    for (int64_t q = 0; q < P; ++q) finish(q, k, total(acc[q]));
  }
}

// y_q[o] += Σₖ h[q·hs + k] · bt[k·n + o], for the block's P pairs q and o < n. Sixty-four outputs at a time
// while they last: each h is broadcast once for four vectors of B̂ and each vector of B̂ serves the P pairs,
// 4·P multiply-adds for 4 loads (then sixteen at a time, then one).
template <int64_t P>
void expand(float* const* y, const float* h, int64_t hs, const float* bt, int64_t rank, int64_t n) {
  constexpr int64_t kWide = 4;
  int64_t o = 0;
  for (; o + kWide * kLanes <= n; o += kWide * kLanes) {
    Lanes acc[P][kWide];
    for (int64_t q = 0; q < P; ++q) {
      for (int64_t v = 0; v < kWide; ++v) acc[q][v] = load(y[q] + o + v * kLanes);
    }
    for (int64_t k = 0; k < rank; ++k) {
      Lanes b[kWide];
      for (int64_t v = 0; v < kWide; ++v) b[v] = load(bt + k * n + o + v * kLanes);
      for (int64_t q = 0; q < P; ++q) {
        const float hk = h[q * hs + k];
        for (int64_t v = 0; v < kWide; ++v) acc[q][v] += hk * b[v];
      }
    }
    for (int64_t q = 0; q < P; ++q) {
      for (int64_t v = 0; v < kWide; ++v) store(y[q] + o + v * kLanes, acc[q][v]);
    }
  }
  for (; o + kLanes <= n; o += kLanes) {
    Lanes acc[P];
    for (int64_t q = 0; q < P; ++q) acc[q] = load(y[q] + o);
    for (int64_t k = 0; k < rank; ++k) {
      const Lanes b = load(bt + k * n + o);
      for (int64_t q = 0; q < P; ++q) acc[q] += h[q * hs + k] * b;
    }
    for (int64_t q = 0; q < P; ++q) store(y[q] + o, acc[q]);
  }
  for (; o < n; ++o) {
    for (int64_t q = 0; q < P; ++q) {
      float acc = y[q][o];
      for (int64_t k = 0; k < rank; ++k) acc += h[q * hs + k] * bt[k * n + o];
      y[q][o] = acc;
    }
  }
}

template <int64_t P, typename W>
void block(float* const* y, const float* const* x, const float* c, float* h, int64_t hs, const W* a, int64_t as,
           const float* bt, int64_t rank, int64_t hidden, int64_t n, bool round_h) {
  shrink<P>(h, hs, a, as, x, c, rank, hidden, round_h);
  expand<P>(y, h, hs, bt, rank, n);
}

// Sixteen rows of a B block with R = 8 columns each, transposed: t[k] = (B[o, k] for o in o₀ … o₀+15), k < 8.
// Three rounds of two-source lane shuffles over the rows' 8 vectors (each holding two rows), 24 in all, instead
// of 128 scalar moves: B is read in place only when the step's slots change too often to keep it gathered.
typedef int32_t Picks __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline void transpose_16x8(Lanes t[8], const Lanes v[8]) {
  // v[m] lanes: (row 2m, k 0..7), (row 2m+1, k 0..7). Round 1: u[p] (p < 4) from v[2p], v[2p+1]: lanes
  // (k, row) with k in 0..3 / 4..7 in its two halves' order: rows 4p..4p+3 for k 0..3 (u[p]) and 4..7 (w[p]).
  const Picks lo = {0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27};
  const Picks hi = {4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31};
  Lanes u[4], w[4];
  for (int p = 0; p < 4; ++p) {
    u[p] = __builtin_shuffle(v[2 * p], v[2 * p + 1], lo);  // k 0..3, four rows 4p..4p+3 each
    w[p] = __builtin_shuffle(v[2 * p], v[2 * p + 1], hi);  // k 4..7
  }
  // Round 2: from (u[0], u[1]) take k 0,1 (rows 0..7) and k 2,3; likewise u[2], u[3] (rows 8..15), w[·].
  const Picks first = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  const Picks second = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  Lanes z[8];
  z[0] = __builtin_shuffle(u[0], u[1], first);   // k 0 rows 0..7, k 1 rows 0..7
  z[1] = __builtin_shuffle(u[0], u[1], second);  // k 2, k 3 (rows 0..7)
  z[2] = __builtin_shuffle(u[2], u[3], first);   // k 0, k 1 (rows 8..15)
  z[3] = __builtin_shuffle(u[2], u[3], second);  // k 2, k 3 (rows 8..15)
  z[4] = __builtin_shuffle(w[0], w[1], first);   // k 4, k 5 (rows 0..7)
  z[5] = __builtin_shuffle(w[0], w[1], second);  // k 6, k 7 (rows 0..7)
  z[6] = __builtin_shuffle(w[2], w[3], first);   // k 4, k 5 (rows 8..15)
  z[7] = __builtin_shuffle(w[2], w[3], second);  // k 6, k 7 (rows 8..15)
  // Round 3: rows 0..7 of k from one vector, rows 8..15 from its partner.
  const Picks even = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const Picks odd = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  for (int q = 0; q < 2; ++q) {  // q = 0: k 0..3 from z[0..3]; q = 1: k 4..7 from z[4..7]
    t[4 * q + 0] = __builtin_shuffle(z[4 * q], z[4 * q + 2], even);
    t[4 * q + 1] = __builtin_shuffle(z[4 * q], z[4 * q + 2], odd);
    t[4 * q + 2] = __builtin_shuffle(z[4 * q + 1], z[4 * q + 3], even);
    t[4 * q + 3] = __builtin_shuffle(z[4 * q + 1], z[4 * q + 3], odd);
  }
}

// out[k·n + o] = B[o·os + k] for k < rank, o < n: one slot's B block transposed (and widened) for `expand`.
// Lane shuffles serve blocks of 8 columns (rank-8 slots) only; other widths take the scalar loop, measured
// 1.5-3x slower than reading a cached gather (benchmarks/results/issue22-20261208b/layout_probe.txt).
template <typename W>
void transpose_block(float* out, const W* b, int64_t os, int64_t rank, int64_t n) {
  int64_t o = 0;
  if (os == 8) {  // rows of 8: sixteen at a time with lane shuffles
    Lanes v[8], t[8];
    for (; o + kLanes <= n; o += kLanes) {
      for (int m = 0; m < 8; ++m) v[m] = load(b + o * 8 + m * kLanes);
      transpose_16x8(t, v);
      for (int64_t k = 0; k < rank; ++k) store(out + k * n + o, t[k]);
    }
  }
  for (; o < n; ++o) {
    const W* row = b + o * os;
    for (int64_t k = 0; k < rank; ++k) out[k * n + o] = widen(row[k]);
  }
}

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

void check_weight(const torch::Tensor& t, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, name, " must be a CPU tensor of the weights' dtype (",
              c10::toString(dtype), "), not ", c10::toString(t.scalar_type()));
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// The loop over groups, slices and blocks of pairs, for weights of type W.
template <typename W>
void run_groups(float* y_data, int64_t y_stride, const float* x_data, int64_t x_stride, int64_t hidden,
                const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, bool b_in_place,
                const std::vector<int64_t>& offsets, const std::vector<int64_t>& widths,
                const std::vector<int64_t>& b_rank, const int64_t* slot, const int64_t* start, const int64_t* rank_of,
                const int64_t* row_of, const float* weight_of, int64_t groups, double scale, bool round_h) {
  int64_t max_rank = 1, max_width = 1;
  for (size_t i = 0; i < a.size(); ++i) {
    max_rank = std::max(max_rank, b_rank[i]);
    max_width = std::max(max_width, widths[i]);
  }
  std::vector<float> h(kBlock * max_rank);
  std::vector<float> transposed(b_in_place ? max_rank * max_width : 0);
  const float* xs[kBlock];
  float* ys[kBlock];
  float c[kBlock];
  for (int64_t g = 0; g < groups; ++g) {
    if (start[g] == start[g + 1]) continue;
    for (size_t i = 0; i < a.size(); ++i) {
      const int64_t r = rank_of[g] < 0 ? b_rank[i] : rank_of[g];
      const int64_t as = a[i].stride(-2), n = widths[i];
      const W* a_block = a[i].data_ptr<W>() + slot[g] * a[i].stride(0);
      const float* bt_block;
      if (b_in_place) {
        transpose_block(transposed.data(), b[i].data_ptr<W>() + slot[g] * b[i].stride(0), b[i].stride(-2), r, n);
        bt_block = transposed.data();
      } else {
        bt_block = b[i].data_ptr<float>() + g * b[i].stride(0);
      }
      for (int64_t p = start[g]; p < start[g + 1]; p += kBlock) {
        const int64_t count = std::min(kBlock, start[g + 1] - p);
        for (int64_t q = 0; q < count; ++q) {
          xs[q] = x_data + row_of[p + q] * x_stride;
          ys[q] = y_data + row_of[p + q] * y_stride + offsets[i];
          c[q] = static_cast<float>(scale) * weight_of[p + q];
        }
        switch (count) {
          case 4: block<4>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n, round_h); break;
          case 3: block<3>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n, round_h); break;
          case 2: block<2>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n, round_h); break;
          default: block<1>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n, round_h); break;
        }
      }
    }
  }
}

}  // namespace

void pair_lora(torch::Tensor y, torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> b,
               torch::Tensor slots, torch::Tensor starts, torch::Tensor ranks, torch::Tensor rows,
               torch::Tensor weights, double scale, bool b_in_place, bool round_h) {
  check_float(y, "y");
  check_float(x, "x");
  check_float(weights, "weights");
  TORCH_CHECK(a.size() == b.size(), "one A and one B per slice");
  TORCH_CHECK(!a.empty(), "at least one slice");
  const torch::ScalarType dtype = a[0].scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "the weights must be float32 or bfloat16, not ",
              c10::toString(dtype));
  TORCH_CHECK(b_in_place || dtype == torch::kFloat32, "a gathered B is float32: bfloat16 weights need b_in_place");
  const int64_t groups = slots.numel(), hidden = x.size(1);
  TORCH_CHECK(starts.numel() == groups + 1 && ranks.numel() == groups, "starts [G+1] and ranks [G]");
  for (auto* t : {&slots, &starts, &ranks, &rows}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->is_contiguous(), "index tensors are contiguous int64");
  }
  TORCH_CHECK(weights.is_contiguous(), "weights are contiguous");
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* rank_of = ranks.data_ptr<int64_t>();
  const int64_t* row_of = rows.data_ptr<int64_t>();
  const float* weight_of = weights.data_ptr<float>();
  std::vector<int64_t> offsets, widths, b_rank;
  int64_t offset = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    check_weight(a[i], dtype, "A");
    TORCH_CHECK(a[i].dim() == 3 || a[i].dim() == 4, "A is [S, 1, R, H] or [S, R, H]");
    TORCH_CHECK(a[i].size(-1) == hidden, "A's input size differs from x's");
    if (b_in_place) {
      check_weight(b[i], dtype, "B");
      TORCH_CHECK(b[i].dim() == 3 || b[i].dim() == 4, "B read in place is [S, 1, n, R] or [S, n, R]");
      TORCH_CHECK(b[i].size(0) == a[i].size(0), "A and B have different numbers of slots");
      widths.push_back(b[i].size(-2));
      b_rank.push_back(b[i].size(-1));
    } else {
      check_float(b[i], "gathered B");
      TORCH_CHECK(b[i].dim() == 3 && b[i].size(0) == groups && b[i].is_contiguous(), "gathered B is [G, R, n]");
      widths.push_back(b[i].size(2));
      b_rank.push_back(b[i].size(1));
    }
    offsets.push_back(offset);
    offset += widths.back();
  }
  TORCH_CHECK(offset <= y.size(1), "the slices are wider than y");
  TORCH_CHECK(rows.numel() == weights.numel() && rows.numel() == start[groups], "one row and weight per pair");
  for (int64_t p = 0; p < rows.numel(); ++p) {
    TORCH_CHECK(row_of[p] >= 0 && row_of[p] < y.size(0) && row_of[p] < x.size(0), "a pair's row is out of range");
  }
  // Every check before the first write: bad input leaves y as it was.
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(start[g] >= 0 && start[g] <= start[g + 1], "starts must begin at 0 or more and not decrease");
    for (int64_t p = start[g] + 1; p < start[g + 1]; ++p) {  // a block of pairs writes each of its rows once
      TORCH_CHECK(row_of[p - 1] < row_of[p], "group ", g, "'s rows must increase");
    }
    for (size_t i = 0; i < a.size(); ++i) {
      const int64_t r = rank_of[g] < 0 ? b_rank[i] : rank_of[g];
      TORCH_CHECK(r <= b_rank[i] && r <= a[i].size(-2), "group ", g, "'s rank ", r, " exceeds its blocks");
      TORCH_CHECK(slot[g] >= 0 && slot[g] < a[i].size(0), "group ", g, "'s slot ", slot[g], " is out of range");
    }
  }
  float* y_data = y.data_ptr<float>();
  const float* x_data = x.data_ptr<float>();
  if (dtype == torch::kBFloat16) {
    run_groups<c10::BFloat16>(y_data, y.stride(0), x_data, x.stride(0), hidden, a, b, b_in_place, offsets, widths,
                              b_rank, slot, start, rank_of, row_of, weight_of, groups, scale, round_h);
  } else {
    run_groups<float>(y_data, y.stride(0), x_data, x.stride(0), hidden, a, b, b_in_place, offsets, widths, b_rank,
                      slot, start, rank_of, row_of, weight_of, groups, scale, round_h);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pair_lora", &pair_lora, "y[rows[p], oᵢ:oᵢ+nᵢ] += (scale·weights[p]) · B̂ᵢ[g]ᵀ Aᵢ[slots[g]] x[rows[p]] for each group g's pairs p "
        "(B̂ᵢ gathered [G, r, nᵢ] float32, or with b_in_place Bᵢ[slots[g]]ᵀ read from the stacked B)",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("slots"),
        pybind11::arg("starts"), pybind11::arg("ranks"), pybind11::arg("rows"), pybind11::arg("weights"),
        pybind11::arg("scale"), pybind11::arg("b_in_place") = false, pybind11::arg("round_h") = false);
}
