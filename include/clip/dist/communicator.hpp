// The one interface through which data-parallel training talks to the other processes. Every
// byte that crosses the network goes through a Communicator: the contrastive loss's feature
// gather and gradient scatter (train/trainer.hpp), the gradient sums (gradient_buckets.hpp), the
// optimizer shards and the agreement checks at start. Two back ends: MpiCommunicator
// (mpi_communicator.hpp, host buffers, Open MPI) and an NCCL communicator for device buffers
// (kernels/dist/); LocalCommunicator is the one-process run, with no MPI at all.
//
// Collectives are called by every rank in the same order with the same sizes. Sizes that differ
// per rank (the slices of a batch that does not divide by the world size) are given as the full
// table `counts`, one entry per rank, identical on every rank.
//
//   rows of the global batch owned by rank r:  [batch_slice(B, W, r).first, ... + .rows)
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "clip/core/batch_slice.hpp"
#include "clip/core/error.hpp"

namespace clip::dist {

using clip::batch_slice;  // clip/core/batch_slice.hpp: rank r's rows of a batch
using clip::Slice;

// Synchronised BatchNorm makes every forward pass a collective, so every rank must run as many
// micro-batches of `micro_batch` rows over its slice of `batch`: refused otherwise, naming a rank.
inline void check_equal_micro_batch_counts(int64_t batch, int64_t micro_batch, int world) {
  const auto passes = [&](int r) {
    const int64_t rows = batch_slice(batch, world, r).rows, m = std::min(micro_batch, rows);
    return (rows + m - 1) / m;
  };
  for (int r = 1; r < world; ++r)
    CLIP_CHECK(passes(r) == passes(0), "synchronised BatchNorm needs the same number of micro-batches on every "
               "rank, but a global batch of ", batch, " over ", world, " processes in micro-batches of ", micro_batch,
               " gives rank 0 ", passes(0), " and rank ", r, " ", passes(r));
}

// Every rank's slice size, in rank order (the counts table of the v-collectives), times `unit`.
inline std::vector<int64_t> slice_counts(int64_t total, int world, int64_t unit = 1) {
  std::vector<int64_t> counts(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) counts[r] = batch_slice(total, world, r).rows * unit;
  return counts;
}

// Whether this process was started by an MPI launcher (mpirun, mpiexec, srun with PMIx).
inline bool launched_by_mpi() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"})
    if (std::getenv(name)) return true;
  return false;
}

// A non-blocking collective in flight; wait() returns once the result is in place.
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual void wait() = 0;
};

// A collective that finished when it was started (the blocking fallback of the start_* calls).
class FinishedCollective final : public PendingCollective {
 public:
  void wait() override {}
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // data[0, n) := the sum over ranks, in place.
  virtual void all_reduce_sum(float* data, int64_t n) = 0;
  virtual void all_reduce_sum(double* data, int64_t n) = 0;
  // The same, started now and finished by wait(); `data` must stay untouched until then. By
  // default it runs at once (blocking): Open MPI progresses a non-blocking collective only inside
  // MPI calls, so MPI_Iallreduce overlapped nothing on the CPU, and its libnbc algorithm took
  // twice the blocking MPI_Allreduce's time (ViT-B/32's 577 MiB of gradients in 16 MiB buckets,
  // 2 processes on one machine: 0.30 s against 0.15 s, and every step faulted in fresh temporary
  // buffers; bench/README.md). The NCCL back end overlaps for real, on its own stream.
  virtual std::unique_ptr<PendingCollective> start_all_reduce_sum(float* data, int64_t n) {
    all_reduce_sum(data, n);
    return std::make_unique<FinishedCollective>();
  }

  // In place: rank r's counts[r] floats already sit at offset sum(counts[0..r)) of `data`;
  // afterwards every rank holds every rank's part.
  virtual void all_gather(float* data, const std::vector<int64_t>& counts) = 0;

  // recv[0, counts[rank]) := the sum over ranks of their send[offset_r, offset_r + counts[rank]),
  // offset_r = sum(counts[0..rank)); send holds sum(counts) floats on every rank.
  virtual void reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& counts) = 0;
  // The same, started now and finished by wait(); `send` must stay untouched and `recv` unread
  // until then. By default it runs at once (blocking); the NCCL back end overlaps it with the
  // compute stream's later work (ZeRO-1's image-tower buckets during the text tower's backward).
  virtual std::unique_ptr<PendingCollective> start_reduce_scatter_sum(const float* send, float* recv,
                                                                      const std::vector<int64_t>& counts) {
    reduce_scatter_sum(send, recv, counts);
    return std::make_unique<FinishedCollective>();
  }

  // `bytes` bytes from rank `root` to every rank.
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;

  virtual void barrier() = 0;

  // Ends every process of the job now (after a rank's unrecoverable error), with `code`.
  [[noreturn]] virtual void abort(int code) = 0;

  // A short description for logs ("1 process", "Open MPI, 4 processes").
  virtual std::string describe() const = 0;
};

// The one-process world: every collective is the identity.
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(float*, int64_t) override {}
  void all_reduce_sum(double*, int64_t) override {}
  void all_gather(float*, const std::vector<int64_t>& counts) override { check_counts(counts); }
  void reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& counts) override {
    check_counts(counts);
    if (send != recv) std::memmove(recv, send, static_cast<size_t>(counts[0]) * sizeof(float));
  }
  void broadcast(void*, int64_t, int root) override {
    CLIP_CHECK(root == 0, "a one-process run has no rank ", root, " to broadcast from");
  }
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }
  std::string describe() const override { return "1 process"; }

 private:
  static void check_counts(const std::vector<int64_t>& counts) {
    CLIP_CHECK(counts.size() == 1, "a one-process collective got ", counts.size(), " counts");
  }
};

// The string `text` of rank 0 against every rank's own: throws on every rank, naming the ranks
// that differ and what they hold, when any rank disagrees (what = "the training options", ...).
// Every rank must call it at the same point; it uses broadcast and all_reduce only.
inline void check_agreement(Communicator& comm, const std::string& text, const char* what) {
  if (comm.size() == 1) return;
  int64_t length = static_cast<int64_t>(text.size());
  comm.broadcast(&length, sizeof length, 0);
  std::string root_text(static_cast<size_t>(length), '\0');
  if (comm.rank() == 0) root_text = text;
  comm.broadcast(root_text.data(), length, 0);
  std::vector<double> differs(static_cast<size_t>(comm.size()), 0.0);
  differs[comm.rank()] = root_text == text ? 0.0 : 1.0;
  comm.all_reduce_sum(differs.data(), static_cast<int64_t>(differs.size()));
  std::string ranks;
  for (int r = 0; r < comm.size(); ++r)
    if (differs[r] != 0.0) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  if (ranks.empty()) return;
  std::string mine = comm.rank() == 0 || root_text == text ? "" : "; this rank (" + std::to_string(comm.rank()) +
                                                                     ") has " + text;
  CLIP_FAIL("the processes disagree on ", what, ": rank 0 has ", root_text, ", rank", ranks.find(',') == std::string::npos ? " " : "s ",
            ranks, " differ", mine);
}

// Every rank's `bytes`, in rank order, on every rank (an all-gather of strings of any length):
// the lengths are summed into place, then each non-empty part is broadcast from its rank. Every
// rank must call it at the same point. For small, rare messages (the data loader's failed records).
inline std::vector<std::string> all_gather_bytes(Communicator& comm, const std::string& bytes) {
  const int world = comm.size();
  if (world == 1) return {bytes};
  std::vector<double> lengths(static_cast<size_t>(world), 0.0);
  lengths[comm.rank()] = static_cast<double>(bytes.size());
  comm.all_reduce_sum(lengths.data(), world);
  std::vector<std::string> all(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    all[r] = r == comm.rank() ? bytes : std::string(static_cast<size_t>(lengths[r]), '\0');
    if (!all[r].empty()) comm.broadcast(all[r].data(), static_cast<int64_t>(all[r].size()), r);
  }
  return all;
}

}  // namespace clip::dist
