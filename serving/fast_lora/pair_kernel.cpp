// The pair op's fused CPU kernel: every (row, slot, weight) pair of a step's scattered rows in one call.
//
// For each group g (one slot s, its pairs p = starts[g] .. starts[g+1]) and each layer slice i:
//
//     h[k]                 = (scale · weights[p]) · Σⱼ Aᵢ[s, k, j] · x[rows[p], j]      k < rᵢ
//     (rᵢ = ranks[g], or all of B̂ᵢ's rows when ranks[g] < 0)
//     y[rows[p], oᵢ + o]  += Σₖ h[k] · B̂ᵢ[g, k, o]                                    o < nᵢ
//
// Aᵢ is vLLM's stacked A ([S, 1, R, H] or [S, R, H]) read in place; B̂ᵢ = Bᵢ[slots]ᵀ, gathered and transposed
// once for the step's slots ([G, R', nᵢ], kept by the caller's cache), so that both loops read their weights
// in order. Each slot's blocks are read from memory once per step and stay in cache across its pairs.
// float32 only, one thread (vLLM's CPU worker runs one torch thread); the sums run in 16 lanes, and a group's
// pairs four at a time, so that each weight is loaded once per four rows.
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

inline void store(float* p, Lanes v) { __builtin_memcpy(p, &v, sizeof(v)); }

inline float total(Lanes v) {
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

// h[q·hs + k] = c[q] · Σⱼ A[k·as + j] · x_q[j], for the block's P pairs q and k < rank.
template <int64_t P>
void shrink(float* h, int64_t hs, const float* a, int64_t as, const float* const* x, const float* c, int64_t rank,
            int64_t n) {
  for (int64_t k = 0; k < rank; ++k) {
    const float* ak = a + k * as;
    Lanes acc[P] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const Lanes av = load(ak + j);
      for (int64_t q = 0; q < P; ++q) acc[q] += av * load(x[q] + j);
    }
    for (int64_t q = 0; q < P; ++q) {
      float sum = total(acc[q]);
      for (int64_t jj = j; jj < n; ++jj) sum += ak[jj] * x[q][jj];
      h[q * hs + k] = c[q] * sum;
    }
  }
}

// y_q[o] += Σₖ h[q·hs + k] · bt[k·n + o], for the block's P pairs q and o < n.
template <int64_t P>
void expand(float* const* y, const float* h, int64_t hs, const float* bt, int64_t rank, int64_t n) {
  int64_t o = 0;
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

template <int64_t P>
void block(float* const* y, const float* const* x, const float* c, float* h, int64_t hs, const float* a, int64_t as,
           const float* bt, int64_t rank, int64_t hidden, int64_t n) {
  shrink<P>(h, hs, a, as, x, c, rank, hidden);
  expand<P>(y, h, hs, bt, rank, n);
}

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

}  // namespace

void pair_lora(torch::Tensor y, torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> bt,
               torch::Tensor slots, torch::Tensor starts, torch::Tensor ranks, torch::Tensor rows,
               torch::Tensor weights, double scale) {
  check_float(y, "y");
  check_float(x, "x");
  check_float(weights, "weights");
  TORCH_CHECK(a.size() == bt.size(), "one A and one gathered B per slice");
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
  float* y_data = y.data_ptr<float>();
  const float* x_data = x.data_ptr<float>();
  const int64_t y_stride = y.stride(0), x_stride = x.stride(0);
  std::vector<int64_t> offsets, widths, a_slot_stride, a_rank_stride, bt_group_stride, bt_rank;
  int64_t offset = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    check_float(a[i], "A");
    check_float(bt[i], "gathered B");
    TORCH_CHECK(a[i].size(-1) == hidden, "A's input size differs from x's");
    TORCH_CHECK(bt[i].dim() == 3 && bt[i].size(0) == groups && bt[i].is_contiguous(), "gathered B is [G, R, n]");
    offsets.push_back(offset);
    widths.push_back(bt[i].size(2));
    offset += bt[i].size(2);
    a_slot_stride.push_back(a[i].stride(0));
    a_rank_stride.push_back(a[i].stride(-2));
    bt_group_stride.push_back(bt[i].stride(0));
    bt_rank.push_back(bt[i].size(1));
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
      const int64_t r = rank_of[g] < 0 ? bt_rank[i] : rank_of[g];
      TORCH_CHECK(r <= bt_rank[i] && r <= a[i].size(-2), "group ", g, "'s rank ", r, " exceeds its blocks");
      TORCH_CHECK(slot[g] >= 0 && slot[g] < a[i].size(0), "group ", g, "'s slot ", slot[g], " is out of range");
    }
  }
  int64_t max_rank = 1;
  for (int64_t r : bt_rank) max_rank = std::max(max_rank, r);
  std::vector<float> h(kBlock * max_rank);
  const float* xs[kBlock];
  float* ys[kBlock];
  float c[kBlock];
  for (int64_t g = 0; g < groups; ++g) {
    for (size_t i = 0; i < a.size(); ++i) {
      const int64_t r = rank_of[g] < 0 ? bt_rank[i] : rank_of[g];
      const float* a_block = a[i].data_ptr<float>() + slot[g] * a_slot_stride[i];
      const float* bt_block = bt[i].data_ptr<float>() + g * bt_group_stride[i];
      for (int64_t p = start[g]; p < start[g + 1]; p += kBlock) {
        const int64_t count = std::min(kBlock, start[g + 1] - p);
        for (int64_t q = 0; q < count; ++q) {
          xs[q] = x_data + row_of[p + q] * x_stride;
          ys[q] = y_data + row_of[p + q] * y_stride + offsets[i];
          c[q] = static_cast<float>(scale) * weight_of[p + q];
        }
        const int64_t as = a_rank_stride[i], n = widths[i];
        switch (count) {
          case 4: block<4>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n); break;
          case 3: block<3>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n); break;
          case 2: block<2>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n); break;
          default: block<1>(ys, xs, c, h.data(), max_rank, a_block, as, bt_block, r, hidden, n); break;
        }
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pair_lora", &pair_lora, "y[rows[p], oᵢ:oᵢ+nᵢ] += (scale·weights[p]) · B̂ᵢ[g]ᵀ Aᵢ[slots[g]] x[rows[p]] for each group g's pairs p",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("a"), pybind11::arg("bt"), pybind11::arg("slots"),
        pybind11::arg("starts"), pybind11::arg("ranks"), pybind11::arg("rows"), pybind11::arg("weights"),
        pybind11::arg("scale"));
}
