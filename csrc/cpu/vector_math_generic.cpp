// Vector-math kernels compiled for the generic instruction set (flags set in CMakeLists.txt).
#define MMFAST_ISA_NAME "generic"
#define MMFAST_ISA_TABLE kVectorMathGeneric
#include "vector_math_impl.h"
