// The one Boost.Test entry point, linked into every test executable.
#define BOOST_TEST_MODULE clip
#define BOOST_TEST_DYN_LINK
#include <boost/test/unit_test.hpp>
