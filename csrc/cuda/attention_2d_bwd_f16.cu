// bwd launchers for c10::Half, all padded head dims (one file per type keeps each nvcc job short).
#include "attention_2d_bwd.cuh"

AANET_INSTANTIATE_ATTENTION_2D_BWD(c10::Half)
