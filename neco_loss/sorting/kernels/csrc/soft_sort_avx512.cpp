// The AVX-512 build of soft_sort.cpp: setup.py compiles this file with -march=x86-64-v4 into
// neco_loss.sorting.kernels._soft_sort_avx512. A file of its own so that its object file does not
// collide with the portable build's when both compile in parallel.
#include "soft_sort.cpp"
