// The Communicator (include/clip/dist/communicator.hpp) over NCCL, for DEVICE buffers: one process
// per GPU, the second back end beside MpiCommunicator. Every pointer given to it is a device
// pointer of this process's GPU, except the host communicator's, used once to start.
//
//   Bootstrap (llm.c's): rank 0 makes the ncclUniqueId and broadcasts it over the host
//   communicator (MPI under mpirun; LocalCommunicator for one process), then every rank joins
//   with ncclCommInitRank on its GPU (the node-local rank, MpiCommunicator::node_rank()).
//
//   Streams: the collectives run on their own stream. Each one first waits for the work already
//   enqueued on the compute stream (an event), and the compute stream waits for its result
//   (another event) before anything later uses it: results are "in place" in stream order, the
//   host is not blocked. start_all_reduce_sum() and start_reduce_scatter_sum() leave that last
//   wait to wait(), so the collective overlaps the compute stream's work in between (the
//   trainer's text tower backward).
//
//   Watchdog: a thread follows every collective in flight (its completion event). A collective
//   that has not finished after `timeout_s`, or an asynchronous NCCL error (a peer's failure,
//   ncclCommGetAsyncError), ends this process with a message naming the rank, after
//   ncclCommAbort; mpirun then ends the other ranks (a process that exits non-zero without
//   MPI_Finalize ends the job). ncclCommInitRank is guarded the same way (a peer that never joins).
//
// Sizes that differ per rank (v-collectives) use one grouped broadcast (all-gather) or reduce
// (reduce-scatter) per rank, NCCL's documented way; equal sizes use ncclAllGather and
// ncclReduceScatter. Host-side agreement checks (check_agreement) belong on the host communicator.
#pragma once

#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#include "clip/core/error.hpp"
#include "clip/dist/communicator.hpp"
#include "kernels/check.cuh"
#include "kernels/device_buffer.cuh"

// expr: an NCCL call returning ncclResult_t.
#define CLIP_NCCL_CHECK(expr)                                                                        \
  do {                                                                                               \
    const ncclResult_t clip_nccl_status_ = (expr);                                                   \
    if (clip_nccl_status_ != ncclSuccess)                                                            \
      CLIP_FAIL("NCCL call failed: ", #expr, ": ", ncclGetErrorString(clip_nccl_status_));           \
  } while (0)

namespace clip::cuda {

class NcclCommunicator final : public dist::Communicator {
 public:
  // Long enough for a first collective that waits on a slow peer's start-up (cuBLASLt plans,
  // data loading); CLIP_NCCL_TIMEOUT (seconds) overrides it.
  static constexpr double kDefaultTimeoutSeconds = 600;

  // Every rank of `host` calls this at the same point. `device`: this process's GPU; `compute`:
  // the stream whose work the collectives follow and which waits for their results.
  NcclCommunicator(dist::Communicator& host, int device, cudaStream_t compute, double timeout_s = timeout_from_env())
      : host_(host), rank_(host.rank()), size_(host.size()), device_(device), compute_(compute), timeout_s_(timeout_s) {
    CLIP_CHECK(timeout_s_ > 0, "the NCCL watchdog needs a positive timeout, got ", timeout_s_);
    CLIP_CUDA_CHECK(cudaSetDevice(device_));
    ncclUniqueId id{};
    if (rank_ == 0) CLIP_NCCL_CHECK(ncclGetUniqueId(&id));
    host_.broadcast(&id, sizeof id, 0);
    CLIP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CLIP_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
    watchdog_ = std::thread([this] { watch(); });
    guard_host_call("ncclCommInitRank");
    const ncclResult_t joined = ncclCommInitRank(&comm_, size_, id, rank_);
    end_host_call();
    if (joined != ncclSuccess) {
      stop_watchdog();
      CLIP_FAIL("rank ", rank_, ": ncclCommInitRank on GPU ", device_, " failed: ", ncclGetErrorString(joined));
    }
    std::lock_guard<std::mutex> lock(mutex_);
    watched_comm_ = comm_;
  }

  ~NcclCommunicator() override {
    stop_watchdog();
    if (comm_) {
      // Finish what is in flight; a communicator in error is aborted instead of destroyed.
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async == ncclSuccess && cudaStreamSynchronize(stream_) == cudaSuccess) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    if (ready_) cudaEventDestroy(ready_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  cudaStream_t stream() const { return stream_; }
  double timeout_seconds() const { return timeout_s_; }

  void all_reduce_sum(float* data, int64_t n) override {
    finish_on_compute(enqueue("all-reduce", [&] { all_reduce(data, n, ncclFloat); }));
  }
  void all_reduce_sum(double* data, int64_t n) override {
    finish_on_compute(enqueue("all-reduce", [&] { all_reduce(data, n, ncclDouble); }));
  }

  std::unique_ptr<dist::PendingCollective> start_all_reduce_sum(float* data, int64_t n) override {
    return std::make_unique<Pending>(compute_, enqueue("all-reduce", [&] { all_reduce(data, n, ncclFloat); }));
  }

  void all_gather(float* data, const std::vector<int64_t>& counts) override {
    check_counts(counts);
    finish_on_compute(enqueue("all-gather", [&] {
      if (equal(counts)) {
        const size_t n = static_cast<size_t>(counts[0]);
        CLIP_NCCL_CHECK(ncclAllGather(data + n * rank_, data, n, ncclFloat, comm_, stream_));
        return;
      }
      CLIP_NCCL_CHECK(ncclGroupStart());
      int64_t offset = 0;
      for (int r = 0; r < size_; ++r) {
        if (counts[r] > 0)
          CLIP_NCCL_CHECK(ncclBroadcast(data + offset, data + offset, static_cast<size_t>(counts[r]), ncclFloat, r,
                                        comm_, stream_));
        offset += counts[r];
      }
      CLIP_NCCL_CHECK(ncclGroupEnd());
    }));
  }

  void reduce_scatter_sum(const float* send, float* recv, const std::vector<int64_t>& counts) override {
    check_counts(counts);
    finish_on_compute(enqueue("reduce-scatter", [&] { reduce_scatter(send, recv, counts); }));
  }

  std::unique_ptr<dist::PendingCollective> start_reduce_scatter_sum(const float* send, float* recv,
                                                                    const std::vector<int64_t>& counts) override {
    check_counts(counts);
    return std::make_unique<Pending>(compute_, enqueue("reduce-scatter", [&] { reduce_scatter(send, recv, counts); }));
  }

  void broadcast(void* data, int64_t bytes, int root) override {
    CLIP_CHECK(root >= 0 && root < size_, "broadcast from rank ", root, " in a world of ", size_, " processes");
    finish_on_compute(enqueue("broadcast", [&] {
      CLIP_NCCL_CHECK(ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, stream_));
    }));
  }

  // Every rank has reached it and every collective before it has finished (the host waits).
  void barrier() override {
    if (!token_.size()) token_ = DeviceBuffer<float>(1);
    CLIP_CUDA_CHECK(cudaMemsetAsync(token_.data(), 0, sizeof(float), compute_));
    all_reduce_sum(token_.data(), 1);
    CLIP_CUDA_CHECK(cudaStreamSynchronize(compute_));
  }

  [[noreturn]] void abort(int code) override {
    if (comm_) ncclCommAbort(comm_);
    host_.abort(code);
    std::_Exit(code);  // host_.abort does not return; this keeps [[noreturn]] honest
  }

  std::string describe() const override {
    return "NCCL, " + std::to_string(size_) + " process" + (size_ == 1 ? "" : "es");
  }

  static double timeout_from_env() {
    const char* text = std::getenv("CLIP_NCCL_TIMEOUT");
    if (!text || !*text) return kDefaultTimeoutSeconds;
    char* end = nullptr;
    const double seconds = std::strtod(text, &end);
    CLIP_CHECK(end && *end == '\0' && seconds > 0, "CLIP_NCCL_TIMEOUT must be a positive number of seconds, got '",
               text, "'");
    return seconds;
  }

 private:
  using Clock = std::chrono::steady_clock;

  // A collective's completion event, shared by the watchdog and a Pending; back to the pool when
  // both are done with it.
  using SharedEvent = std::shared_ptr<cudaEvent_t>;

  struct InFlight {
    SharedEvent done;
    const char* what;
    Clock::time_point started;
  };

  class Pending final : public dist::PendingCollective {
   public:
    Pending(cudaStream_t compute, SharedEvent done) : compute_(compute), done_(std::move(done)) {}
    void wait() override {
      if (done_) CLIP_CUDA_CHECK(cudaStreamWaitEvent(compute_, *done_, 0));
      done_.reset();
    }
    ~Pending() override {
      if (done_) cudaStreamWaitEvent(compute_, *done_, 0);
    }

   private:
    cudaStream_t compute_;
    SharedEvent done_;
  };

  dist::Communicator& host_;
  int rank_, size_, device_;
  cudaStream_t compute_;
  double timeout_s_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;  // the compute stream's point each collective starts after
  DeviceBuffer<float> token_;    // barrier()'s one float

  std::mutex pool_mutex_;  // guards free_events_ (its own: events return from under mutex_)
  std::vector<cudaEvent_t> free_events_;
  std::mutex mutex_;  // guards everything below
  std::condition_variable wake_;
  std::deque<InFlight> in_flight_;          // in comm-stream order
  const char* host_call_ = nullptr;         // a blocking NCCL call under way on the main thread
  Clock::time_point host_call_started_;
  ncclComm_t watched_comm_ = nullptr;      // comm_, once ncclCommInitRank has returned it
  bool stopping_ = false;
  std::thread watchdog_;

  static bool equal(const std::vector<int64_t>& counts) {
    for (int64_t c : counts)
      if (c != counts[0]) return false;
    return true;
  }

  void check_counts(const std::vector<int64_t>& counts) const {
    CLIP_CHECK(static_cast<int>(counts.size()) == size_, "a collective over ", size_, " processes got ", counts.size(),
               " counts");
    for (int64_t c : counts) CLIP_CHECK(c >= 0, "a collective got a negative count, ", c);
  }

  void all_reduce(void* data, int64_t n, ncclDataType_t type) {
    CLIP_NCCL_CHECK(ncclAllReduce(data, data, static_cast<size_t>(n), type, ncclSum, comm_, stream_));
  }

  void reduce_scatter(const float* send, float* recv, const std::vector<int64_t>& counts) {
    if (equal(counts)) {
      CLIP_NCCL_CHECK(ncclReduceScatter(send, recv, static_cast<size_t>(counts[0]), ncclFloat, ncclSum, comm_, stream_));
      return;
    }
    CLIP_NCCL_CHECK(ncclGroupStart());
    int64_t offset = 0;
    for (int r = 0; r < size_; ++r) {  // recv is read by NCCL on the root only
      if (counts[r] > 0)
        CLIP_NCCL_CHECK(ncclReduce(send + offset, recv, static_cast<size_t>(counts[r]), ncclFloat, ncclSum, r, comm_,
                                   stream_));
      offset += counts[r];
    }
    CLIP_NCCL_CHECK(ncclGroupEnd());
  }

  SharedEvent acquire_event() {
    cudaEvent_t e = nullptr;
    {
      std::lock_guard<std::mutex> lock(pool_mutex_);
      if (!free_events_.empty()) {
        e = free_events_.back();
        free_events_.pop_back();
      }
    }
    if (!e) CLIP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return SharedEvent(new cudaEvent_t(e), [this](cudaEvent_t* p) {
      std::lock_guard<std::mutex> lock(pool_mutex_);
      free_events_.push_back(*p);
      delete p;
    });
  }

  // The collective `call` on the communication stream after the compute stream's work so far;
  // returns its completion event, which the watchdog follows.
  template <class Call>
  SharedEvent enqueue(const char* what, Call&& call) {
    CLIP_CUDA_CHECK(cudaEventRecord(ready_, compute_));
    CLIP_CUDA_CHECK(cudaStreamWaitEvent(stream_, ready_, 0));
    guard_host_call(what);  // a grouped call can block on the host until its peers arrive
    call();
    end_host_call();
    SharedEvent done = acquire_event();
    CLIP_CUDA_CHECK(cudaEventRecord(*done, stream_));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_flight_.push_back({done, what, Clock::now()});
    }
    wake_.notify_one();
    return done;
  }

  void finish_on_compute(const SharedEvent& done) { CLIP_CUDA_CHECK(cudaStreamWaitEvent(compute_, *done, 0)); }

  void guard_host_call(const char* what) {
    std::lock_guard<std::mutex> lock(mutex_);
    host_call_ = what;
    host_call_started_ = Clock::now();
  }
  void end_host_call() {
    std::lock_guard<std::mutex> lock(mutex_);
    host_call_ = nullptr;
  }

  void stop_watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_one();
    if (watchdog_.joinable()) watchdog_.join();
    std::lock_guard<std::mutex> lock(mutex_);
    in_flight_.clear();
  }

  // The watchdog thread: every 20 ms, retires the finished collectives and checks the oldest
  // one's age, the blocking host call's age and NCCL's asynchronous error.
  void watch() {
    cudaSetDevice(device_);
    const auto limit = std::chrono::duration<double>(timeout_s_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_) {
      wake_.wait_for(lock, std::chrono::milliseconds(20));
      if (stopping_) break;
      while (!in_flight_.empty()) {
        const cudaError_t state = cudaEventQuery(*in_flight_.front().done);
        if (state == cudaErrorNotReady) break;
        if (state != cudaSuccess) fail(lock, in_flight_.front().what, std::string("CUDA error ") + cudaGetErrorName(state));
        in_flight_.pop_front();
      }
      const Clock::time_point now = Clock::now();
      if (!in_flight_.empty() && now - in_flight_.front().started > limit)
        fail(lock, in_flight_.front().what, "did not finish within " + seconds_text() + " (a peer is dead or stuck)");
      if (host_call_ && now - host_call_started_ > limit)
        fail(lock, host_call_, "did not return within " + seconds_text() + " (a peer never joined)");
      if (watched_comm_) {
        ncclResult_t async = ncclSuccess;
        if (ncclCommGetAsyncError(watched_comm_, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress)
          fail(lock, in_flight_.empty() ? "communicator" : in_flight_.front().what,
               std::string("failed: ") + ncclGetErrorString(async) + " (a peer failed)");
      }
    }
  }

  std::string seconds_text() const { return std::to_string(static_cast<int64_t>(timeout_s_)) + " s"; }

  // Ends this process: the message, ncclCommAbort (frees a kernel stuck on a dead peer), exit 1.
  [[noreturn]] void fail(std::unique_lock<std::mutex>& lock, const char* what, const std::string& why) {
    const ncclComm_t comm = watched_comm_;
    lock.unlock();
    std::fprintf(stderr, "clip: rank %d of %d (GPU %d): NCCL %s %s; aborting the job\n", rank_, size_, device_, what,
                 why.c_str());
    std::fflush(stderr);
    std::fflush(stdout);
    if (comm) ncclCommAbort(comm);
    std::_Exit(1);
  }
};

}  // namespace clip::cuda
