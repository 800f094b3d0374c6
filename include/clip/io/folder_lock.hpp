// An exclusive lock on a folder for as long as one run writes into it: flock(2) on a lock file
// inside it, which also holds the owner's process id for the message a second run gets. The
// kernel drops the lock when the process ends, however it ends, so a crashed run leaves nothing
// to clean up (the file stays; only the lock on it counts).
#pragma once

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

#include "clip/core/error.hpp"

namespace clip::io {

class FolderLock {
 public:
  static constexpr const char* kFileName = ".clip-lock";

  // Locks `folder` (which must exist) or throws clip::Error naming the folder and the process
  // that holds it.
  explicit FolderLock(const std::filesystem::path& folder) : path_(folder / kFileName) {
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    CLIP_CHECK(fd_ >= 0, "cannot create the lock file '", path_.string(), "': ", std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int error = errno;
      const std::string owner = read_owner();
      ::close(fd_);
      CLIP_CHECK(error != EWOULDBLOCK, "the folder '", folder.string(), "' is in use by another run (",
                 owner.empty() ? std::string("process unknown") : "process " + owner,
                 "): two runs writing to one folder would mix their files; wait for it to end or choose another folder");
      CLIP_FAIL("cannot lock the folder '", folder.string(), "' (", path_.string(), "): ", std::strerror(error));
    }
    const std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
      // The lock holds without the id; a second run's message just cannot name this process.
    }
  }
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;
  ~FolderLock() { ::close(fd_); }

 private:
  std::string read_owner() const {
    char buffer[32] = {};
    const ssize_t n = ::pread(fd_, buffer, sizeof buffer - 1, 0);
    std::string text(buffer, n > 0 ? static_cast<size_t>(n) : 0);
    while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
    return text.find_first_not_of("0123456789") == std::string::npos ? text : std::string();
  }

  std::filesystem::path path_;
  int fd_ = -1;
};

}  // namespace clip::io
