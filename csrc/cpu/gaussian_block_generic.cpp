// Gaussian block generator compiled for the generic instruction set (flags set in CMakeLists.txt).
#define MMFAST_GAUSSIAN_BLOCK_FN gaussian_block_generic
#include "gaussian_block_impl.h"
