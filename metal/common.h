// dhsa common helpers, shared by both backends: passed in `header=` after the backend's
// prelude (prelude_metal.h or prelude_cuda.h), whose vocabulary it uses.

#define DHSA_LOG2E 1.4426950408889634f
#define DHSA_LN2 0.6931471805599453f

DHSA_INLINE int dhsa_min(int a, int b) { return a < b ? a : b; }
DHSA_INLINE int dhsa_imax(int a, int b) { return a > b ? a : b; }
