// FolderLock (clip/io/folder_lock.hpp): one holder at a time, the refusal names the folder and
// the holder's process id, and the lock goes with its holder (also when the holder dies).
#include <boost/test/unit_test.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <string>

#include "clip/io/folder_lock.hpp"
#include "messages.hpp"
#include "program_runner.hpp"

namespace fs = std::filesystem;
using clip::test::message_of;

BOOST_AUTO_TEST_CASE(a_held_folder_is_refused_with_the_holders_pid_until_released) {
  const clip::test::TempDir dir;
  {
    const clip::io::FolderLock first(dir.path);
    const std::string refused = message_of([&] { clip::io::FolderLock second(dir.path); });
    BOOST_TEST(refused.find("the folder '" + dir.path.string() + "' is in use by another run (process " +
                            std::to_string(::getpid()) + ")") != std::string::npos,
               refused);
  }
  BOOST_TEST(message_of([&] { clip::io::FolderLock again(dir.path); }) == "");
}

BOOST_AUTO_TEST_CASE(a_lock_held_by_a_process_that_died_is_free) {
  const clip::test::TempDir dir;
  const pid_t child = ::fork();
  if (child == 0) {
    const clip::io::FolderLock held(dir.path);
    ::_exit(0);  // no destructor runs: the kernel alone releases the lock
  }
  int status = 0;
  BOOST_TEST_REQUIRE(::waitpid(child, &status, 0) == child);
  BOOST_TEST(fs::exists(dir.path / clip::io::FolderLock::kFileName));
  BOOST_TEST(message_of([&] { clip::io::FolderLock after(dir.path); }) == "");
}

BOOST_AUTO_TEST_CASE(a_missing_folder_is_an_error_naming_it) {
  const clip::test::TempDir dir;
  const std::string message = message_of([&] { clip::io::FolderLock lock(dir.path / "missing"); });
  BOOST_TEST(message.find((dir.path / "missing").string()) != std::string::npos, message);
}
