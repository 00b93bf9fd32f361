// Vector-math kernels compiled for the avx512 instruction set (flags set in CMakeLists.txt).
#define MMFAST_ISA_NAME "avx512"
#define MMFAST_ISA_TABLE kVectorMathAvx512
#include "vector_math_impl.h"
