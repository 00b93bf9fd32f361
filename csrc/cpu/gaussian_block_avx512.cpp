// Gaussian block generator compiled for the avx512 instruction set (flags set in CMakeLists.txt).
#define MMFAST_GAUSSIAN_BLOCK_FN gaussian_block_avx512
#include "gaussian_block_impl.h"
