/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Ingress stage 3: clone the packet once per kernel-path subscriber of each track it carries,
 * to that subscriber's egress interface. The egress program runs on each clone before
 * bpf_clone_redirect returns (scratch.armed tells it which subscriber the clone is for).
 */
#ifndef FR_MOQ_CLONE_H
#define FR_MOQ_CLONE_H

#include "moq/maps.h"

struct fan_ctx {
	struct __sk_buff *skb;
	struct scratch *s;
	struct fr_moq_track *set;
	__u32 count;
	__u32 clones;
};

static long clone_cb(__u32 i, void *data)
{
	struct fan_ctx *c = data;
	struct fr_moq_conn *conn;
	__u32 slot;

	if (i >= FR_MOQ_MAX_SUBS || i >= c->count)
		return 1;
	slot = c->set->conns[BOUNDED(i, FR_MOQ_MAX_SUBS - 1)];
	conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	if (!conn || !conn->gen)
		return 0;
	c->s->armed = slot + 1;
	if (bpf_clone_redirect(c->skb, conn->ifindex, 0))
		count(FR_MQ_CLONE_DROPPED);      /* the egress said why, in its own counters */
	else
		c->clones++;
	c->s->armed = 0;
	return 0;
}

/* Clone the packet for every subscriber of every track found in it; how many clones left. */
GLOBAL int fr_moq_fan_out(struct __sk_buff *skb)
{
	struct fan_ctx fc = { .skb = skb };
	struct scratch *s = scratch();
	__u32 j, t;

	if (!skb || !s)
		return 0;
	fc.s = s;
	for (j = 0; j < FR_MOQ_MAX_TRACKS; j++) {
		if (j >= s->ntracks)
			break;
		t = s->tracks[j];
		fc.set = bpf_map_lookup_elem(&fr_moq_tracks, &t);
		if (!fc.set || !fc.set->count)
			continue;
		fc.count = fc.set->count;
		s->track = t;
		bpf_loop(FR_MOQ_MAX_SUBS, clone_cb, &fc, 0);
	}
	s->armed = 0;
	return fc.clones;
}

#endif /* FR_MOQ_CLONE_H */
