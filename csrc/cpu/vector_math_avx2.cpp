// Vector-math kernels compiled for the avx2 instruction set (flags set in CMakeLists.txt).
#define MMFAST_ISA_NAME "avx2"
#define MMFAST_ISA_TABLE kVectorMathAvx2
#include "vector_math_impl.h"
