// Prepended to every kernel body on Metal: MLX adds a Metal attribute to the generated
// signature only when its name occurs in the body, so the thread ids are bound here.
const int dhsa_tid = int(thread_position_in_threadgroup.x);
const int dhsa_lane = int(thread_index_in_simdgroup);
const int dhsa_warp = int(simdgroup_index_in_threadgroup);
const int dhsa_gx = int(threadgroup_position_in_grid.x);
const int dhsa_gy = int(threadgroup_position_in_grid.y);
const int dhsa_gz = int(threadgroup_position_in_grid.z);
