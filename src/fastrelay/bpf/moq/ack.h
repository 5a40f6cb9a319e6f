/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Ingress, subscriber side: a 1-RTT packet to the relay's current connection id on a
 * kernel-path subscriber connection, from that subscriber's validated address, holding one ACK
 * frame and nothing but PADDING, is read and dropped. With the connection's recovery in the
 * kernel it is applied there (moq/recovery.h), and goes to userspace as an ACK record only while
 * packets userspace built are outstanding; without, every one becomes an ACK record (applied
 * to aioquic's loss recovery without the packet climbing the stack). Anything else goes up
 * untouched.
 */
#ifndef FR_MOQ_ACK_H
#define FR_MOQ_ACK_H

#include "moq/varint.h"
#include "moq/recovery.h"

/* Reading position in the ACK frame, across bpf_loop steps. */
struct ack_ctx {
	__u32 off;
	__u32 end;
	__u32 count;                 /* ranges the frame has */
	__u32 err;
};

/* One more ACK Range (Gap, ACK Range Length) below the last one read into scratch.ack. */
GLOBAL int fr_moq_ack_range(struct ack_ctx *c)
{
	struct scratch *s = scratch();
	struct fr_moq_ack_range *prev, *next;
	__u64 gap, len, lo;
	__u32 n_read;
	int n;

	if (!s || !c)
		return 1;
	n_read = s->ack.nranges;
	if (n_read >= c->count || n_read < 1 || n_read >= FR_MOQ_MAX_ACK_RANGES)
		return 1;
	n = varint_get(s->in, c->off, c->end, &gap);
	if (n < 0)
		goto bad;
	c->off += n;
	n = varint_get(s->in, c->off, c->end, &len);
	if (n < 0)
		goto bad;
	c->off += n;
	prev = &s->ack.ranges[BOUNDED(n_read - 1, FR_MOQ_MAX_ACK_RANGES - 1)];
	next = &s->ack.ranges[BOUNDED(n_read, FR_MOQ_MAX_ACK_RANGES - 1)];
	lo = prev->smallest;
	if (gap + 2 > lo || len > lo - gap - 2)    /* below packet number 0: a malformed frame */
		goto bad;
	next->largest = lo - gap - 2;
	next->smallest = lo - gap - 2 - len;
	s->ack.nranges++;
	return 0;
bad:
	c->err = 1;
	return 1;
}

static long ack_range_cb(__u32 i, void *ctx)
{
	return CB_RESULT(fr_moq_ack_range(ctx));
}

/* The ACK frame at scratch.in[SHORT_HDR_LEN, end), into scratch.ack; 0 if it is one we take. */
static __always_inline int read_ack(struct scratch *s, __u32 end)
{
	struct ack_ctx ac = { .end = end };
	__u64 largest, delay, nranges, first_range;
	__u32 off = SHORT_HDR_LEN, i;
	int n;

	if (off >= end || s->in[off] != 0x02)       /* ACK (ACK_ECN carries counts: it goes up) */
		return -1;
	off++;
	n = varint_get(s->in, off, end, &largest);
	if (n < 0)
		return -1;
	off += n;
	n = varint_get(s->in, off, end, &delay);
	if (n < 0)
		return -1;
	off += n;
	n = varint_get(s->in, off, end, &nranges);
	if (n < 0 || nranges >= FR_MOQ_MAX_ACK_RANGES)
		return -1;
	off += n;
	n = varint_get(s->in, off, end, &first_range);
	if (n < 0 || first_range > largest)
		return -1;
	off += n;
	s->ack.largest = largest;
	s->ack.ack_delay = delay;
	s->ack.ranges[0].largest = largest;
	s->ack.ranges[0].smallest = largest - first_range;
	s->ack.nranges = 1;
	ac.off = off;
	ac.count = nranges + 1;
	bpf_loop(FR_MOQ_MAX_ACK_RANGES, ack_range_cb, &ac, 0);
	if (ac.err || s->ack.nranges != ac.count)
		return -1;
	for (i = 0; i < FR_MOQ_ACK_MAX_PAYLOAD; i++) {    /* the rest must be PADDING */
		if (ac.off + i >= end)
			break;
		if (s->in[BOUNDED(ac.off + i, 0xff)])
			return -1;
	}
	return 0;
}

/* A packet to `cid` that is not a publisher's: read and drop it if it is a kernel-path
 * subscriber's ACK-only packet; a TC verdict. */
GLOBAL int fr_moq_absorb_ack(struct __sk_buff *skb, struct fr_udp_pkt *p, struct fr_moq_cid *cid, __u32 plen,
			     __u32 first)
{
	struct fr_moq_slot *hs;
	struct fr_moq_conn *conn;
	struct scratch *s = scratch();
	__u32 slot, n;
	__u64 size;
	int ret;

	if (!skb || !p || !cid || !s)
		return TC_ACT_UNSPEC;
	hs = bpf_map_lookup_elem(&fr_moq_hcid, cid);
	if (!hs)
		return TC_ACT_UNSPEC;
	slot = hs->slot;
	conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	if (!conn || !conn->gen || conn->gen != hs->gen || !conn->absorb_acks)
		return TC_ACT_UNSPEC;
	if (p->family != conn->family || p->sport != conn->dst_port || !fr_addr_eq(p->saddr, conn->dst_ip))
		return TC_ACT_UNSPEC;                     /* another path: aioquic validates it */
	if ((first & 0x1f) != 0x01 || plen > FR_MOQ_ACK_MAX_PAYLOAD || skb->gso_segs > 1)
		return TC_ACT_UNSPEC;                     /* key update, reserved bits, long numbers, size */
	n = BOUNDED(plen, 0xff);                      /* bounds the verifier sees at the call */
	if (n < SHORT_HDR_LEN + FR_MOQ_TAG_LEN || bpf_skb_load_bytes(skb, p->l4_off + sizeof(struct udphdr), s->in, n))
		return TC_ACT_UNSPEC;
	if (*(__u64 *)&s->in[BOUNDED(plen - FR_MOQ_TAG_LEN, 0xff)] || *(__u64 *)&s->in[BOUNDED(plen - 8, 0xff)])
		return TC_ACT_UNSPEC;                     /* not identity protection */
	if (read_ack(s, plen - FR_MOQ_TAG_LEN))
		return TC_ACT_UNSPEC;
	if (bpf_ringbuf_query(&fr_moq_events, BPF_RB_AVAIL_DATA) > RB_ACKS_UP_AT) {
		count(FR_MQ_ACKS_PASSED_BUSY);
		return TC_ACT_UNSPEC;                     /* the relay is behind: aioquic reads it the slow way */
	}
	s->ack.kind = FR_MOQ_REC_ACK;
	s->ack.pn = ((__u16)s->in[1 + FR_MOQ_CID_LEN] << 8) | s->in[2 + FR_MOQ_CID_LEN];
	s->ack.slot = slot;
	s->ack.gen = hs->gen;
	s->ack.bytes = plen;
	s->ack.time_ns = bpf_ktime_get_ns();
	if (conn->recovery) {
		/* the kernel's recovery takes it; userspace hears of it only for its own packets */
		ret = fr_lr_absorb(slot, hs->gen);
		if (ret < 0 || ret & 2)
			return TC_ACT_UNSPEC;
		count(FR_MQ_ACKS_ABSORBED);
		if (!(ret & 1))
			return TC_ACT_SHOT;
	}
	n = s->ack.nranges > FR_MOQ_MAX_ACK_RANGES ? FR_MOQ_MAX_ACK_RANGES : s->ack.nranges;
	size = offsetof(struct fr_moq_ack, ranges) + n * sizeof(struct fr_moq_ack_range);
	if (bpf_ringbuf_output(&fr_moq_events, &s->ack, size, BPF_RB_FORCE_WAKEUP)) {
		count(FR_MQ_RINGBUF_FULL);
		return TC_ACT_UNSPEC;
	}
	if (!conn->recovery)
		count(FR_MQ_ACKS_ABSORBED);
	return TC_ACT_SHOT;
}

#endif /* FR_MOQ_ACK_H */
