/* VECTOR_CLONES: compile a function for AVX2 and for the baseline and pick one at load time
 * (GNU ifunc), on x86-64 Linux with a compiler that has target_clones; elsewhere nothing.
 * The clones run the same operations (IEEE float or integer), 8 lanes at a time under AVX2,
 * so they give the same bits. Shared by the TIES and DARE kernels. */
#ifndef SPLICE_VECTOR_CLONES_H
#define SPLICE_VECTOR_CLONES_H

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

#endif
