// The Communicator over MPI (Open MPI), for host buffers: processes started by mpirun (or Slurm's
// srun), on one machine or many. Needs <mpi.h> and the MPI library, so this header is not part of
// the g++-alone header checks; programs that do not include it need no MPI.
//
//   clip::dist::MpiSession mpi;                   // MPI_Init_thread only when launched by mpirun
//   std::unique_ptr<clip::dist::Communicator> comm = mpi.communicator();   // Local when not
//
// Sizes above INT_MAX elements go in pieces (MPI counts are int). Errors: MPI's default handler
// (MPI_ERRORS_ARE_FATAL) ends the job on a failed call; a rank killed by a signal makes mpirun
// end the others (Open MPI's default), so no collective waits forever on a dead peer.
#pragma once

// The C API only (Open MPI and MPICH would otherwise pull in their deprecated C++ bindings).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "clip/core/error.hpp"
#include "clip/dist/communicator.hpp"

namespace clip::dist {

class MpiCommunicator final : public Communicator {
 public:
  // MPI must be initialised (MpiSession does it); `comm` is duplicated, so collectives here
  // never mix with another library's traffic on the same communicator.
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD) {
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm handle() const { return comm_; }

  void all_reduce_sum(float* data, int64_t n) override { all_reduce(data, n, MPI_FLOAT); }
  void all_reduce_sum(double* data, int64_t n) override { all_reduce(data, n, MPI_DOUBLE); }

  void all_gather(float* data, const std::vector<int64_t>& counts) override {
    std::vector<int> sizes, offsets;
    v_table(counts, sizes, offsets);
    check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, sizes.data(), offsets.data(), MPI_FLOAT, comm_),
          "MPI_Allgatherv");
  }

  void reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& counts) override {
    std::vector<int> sizes, offsets;
    v_table(counts, sizes, offsets);
    check(MPI_Reduce_scatter(send, recv, sizes.data(), MPI_FLOAT, MPI_SUM, comm_), "MPI_Reduce_scatter");
  }

  void broadcast(void* data, int64_t bytes, int root) override {
    char* p = static_cast<char*>(data);
    for (int64_t at = 0; at < bytes; at += kMaxCount)
      check(MPI_Bcast(p + at, piece(bytes - at), MPI_BYTE, root, comm_), "MPI_Bcast");
  }

  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier"); }

  [[noreturn]] void abort(int code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; this keeps [[noreturn]] honest
  }

  std::string describe() const override {
    return "MPI, " + std::to_string(size_) + " process" + (size_ == 1 ? "" : "es");
  }

 private:
  static constexpr int64_t kMaxCount = INT_MAX / 2;  // elements per MPI call

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;

  static int piece(int64_t left) { return static_cast<int>(std::min(left, kMaxCount)); }

  static void check(int code, const char* call) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    CLIP_FAIL(call, " failed: ", std::string(text, static_cast<size_t>(length)));
  }

  template <class T>
  void all_reduce(T* data, int64_t n, MPI_Datatype type) {
    for (int64_t at = 0; at < n; at += kMaxCount)
      check(MPI_Allreduce(MPI_IN_PLACE, data + at, piece(n - at), type, MPI_SUM, comm_), "MPI_Allreduce");
  }

  void v_table(const std::vector<int64_t>& counts, std::vector<int>& sizes, std::vector<int>& offsets) const {
    CLIP_CHECK(static_cast<int>(counts.size()) == size_, "a collective over ", size_, " processes got ", counts.size(),
               " counts");
    int64_t total = 0;
    for (int64_t c : counts) {
      CLIP_CHECK(c >= 0 && total + c <= INT_MAX, "a gather or scatter of ", total + c,
                 " floats is beyond one MPI call's int count");
      sizes.push_back(static_cast<int>(c));
      offsets.push_back(static_cast<int>(total));
      total += c;
    }
  }
};

// This process's rank among the processes on its machine (MPI_COMM_TYPE_SHARED): with one process
// per GPU, the GPU it drives (llm.c's way). MPI must be initialised.
inline int node_rank(MPI_Comm comm = MPI_COMM_WORLD) {
  MPI_Comm node = MPI_COMM_NULL;
  int rank = 0;
  if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS)
    CLIP_FAIL("MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) failed: cannot tell the processes of this machine apart");
  MPI_Comm_rank(node, &rank);
  MPI_Comm_free(&node);
  return rank;
}

// MPI for the life of a program: initialised when launched by mpirun (funneled threads: only
// the main thread calls MPI), finalised at the end. Without a launcher it does nothing and
// communicator() is the one-process LocalCommunicator, so a plain run needs no MPI runtime.
class MpiSession {
 public:
  MpiSession() {
    if (!launched_by_mpi()) return;
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      CLIP_FAIL("MPI_Init_thread failed");
    active_ = true;
  }
  ~MpiSession() {
    if (active_) MPI_Finalize();
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  bool active() const { return active_; }

  std::unique_ptr<Communicator> communicator() const {
    if (!active_) return std::make_unique<LocalCommunicator>();
    return std::make_unique<MpiCommunicator>();
  }

 private:
  bool active_ = false;
};

}  // namespace clip::dist
