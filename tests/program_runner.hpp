// Running a command-line program from a test as a user runs it: no shell (arguments need no
// quoting), stdin empty, stdout and stderr captured through files in a temporary folder.
// meson passes each program's path in an environment variable.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>

extern char** environ;

namespace clip::test {

// A fresh folder under the system's temporary directory, removed with everything in it.
struct TempDir {
  std::filesystem::path path = std::filesystem::temp_directory_path() /
                               ("clip-test-" + std::to_string(::getpid()) + "-" + std::to_string(std::random_device{}()));
  TempDir() { std::filesystem::create_directories(path); }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

struct ProgramResult {
  int status;  // the exit status, or 128 + the signal that ended the program
  std::string out, err;
};

// The program named by the environment variable `env_var`, running in the background.
class RunningProgram {
 public:
  RunningProgram(const char* env_var, const std::vector<std::string>& args) {
    const char* program = std::getenv(env_var);
    BOOST_TEST_REQUIRE(program != nullptr, env_var << " is not set (meson sets it)");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 1, out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, 2, err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<char*> argv{const_cast<char*>(program)};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    const int spawned = posix_spawn(&pid_, program, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    BOOST_TEST_REQUIRE(spawned == 0, "cannot run " << program);
  }
  ~RunningProgram() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  RunningProgram(const RunningProgram&) = delete;
  RunningProgram& operator=(const RunningProgram&) = delete;

  void signal(int sig) const { kill(pid_, sig); }
  pid_t pid() const { return pid_; }

  ProgramResult wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), slurp(out_), slurp(err_)};
  }

 private:
  TempDir dir_;
  std::string out_ = dir_ / "out", err_ = dir_ / "err";
  pid_t pid_ = -1;
};

// Runs the program to its end.
inline ProgramResult run_program(const char* env_var, const std::vector<std::string>& args) {
  return RunningProgram(env_var, args).wait();
}

}  // namespace clip::test
