// fwd launchers for double, all padded head dims (one file per type keeps each nvcc job short).
#include "attention_2d_fwd.cuh"

AANET_INSTANTIATE_ATTENTION_2D_FWD(double)
