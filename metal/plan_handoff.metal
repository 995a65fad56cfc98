// dhsa_plan (middle part): the fused planning kernel is block_scores.metal, this, and
// select_keys.metal, each in a scope of its own (kernels.kernel_source assembles "plan").
// inputs : tickets [B * NB] int32, zeros (one per query block); sel_params int32:
//          select_keys' iparams (kernels.sources.SelectParams)
// The groups of one (block, batch) have written their scores; each takes a ticket, and the
// group with the last one sets it back to zero (the buffer serves the next launch) and goes
// on to select that block's keys, after a device-scope fence. The others are done.
DHSA_SHARED(int, handoff_s, 1);
{
  const int bs = iparams[BS_BLOCK_SIZE];
  const int n_blocks = (iparams[BS_N_Q] + bs - 1) / bs;
  // Groups per block: n_chunks (n_closed + n_open) / per_group, rounded up.
  const int n_tiles =
      (iparams[BS_N_CLOSED] + iparams[BS_N_OPEN] + iparams[BS_PER_GROUP] - 1) /
      iparams[BS_PER_GROUP];
  DHSA_DEVICE const int* ticket = tickets + dhsa_gz * n_blocks + dhsa_gy;
  dhsa_fence_device();
  DHSA_BARRIER();
  if (dhsa_tid == 0) {
    const bool last = dhsa_take_ticket(ticket) == n_tiles - 1;
    if (last) {
      dhsa_reset_ticket(ticket);
    }
    handoff_s[0] = last ? 1 : 0;
  }
  DHSA_BARRIER();
}
if (handoff_s[0] == 0) {
  return;
}
dhsa_fence_device();
