/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress, userspace's packets: a 1-RTT packet aioquic sent on a kernel-path connection takes
 * its number from the connection's shared counter (the kernel's clones use the same space),
 * and a RENUMBERED record tells userspace which number its packet left with.
 */
#ifndef FR_MOQ_RENUMBER_H
#define FR_MOQ_RENUMBER_H

#include "moq/build.h"

/* A TC verdict for a packet leaving on an egress interface that is not a clone. */
GLOBAL int fr_moq_renumber(struct __sk_buff *skb)
{
	struct fr_moq_renumbered rec = { .kind = FR_MOQ_REC_RENUMBERED };
	struct fr_udp_pkt p = {};
	struct fr_moq_config *cfg;
	struct fr_moq_cid cid;
	struct fr_moq_slot *sl;
	struct fr_moq_state *st;
	__u32 zero = 0, off, slot;
	__u8 word[4], nword[4];
	__u64 pn;
	__u8 first;

	cfg = bpf_map_lookup_elem(&fr_moq_cfg, &zero);
	if (!skb || !cfg)
		return TC_ACT_UNSPEC;
	if (fr_parse_udp(skb, &p) != FR_PARSE_OK || p.fragment || p.sport != cfg->port)
		return TC_ACT_UNSPEC;
	off = p.l4_off + sizeof(struct udphdr);
	if (bpf_skb_load_bytes(skb, off, &first, 1) || (first & 0xc0) != 0x40 ||
	    bpf_skb_load_bytes(skb, off + 1, &cid, sizeof(cid)))
		return TC_ACT_UNSPEC;
	sl = bpf_map_lookup_elem(&fr_moq_dcid, &cid);
	if (!sl)
		return TC_ACT_UNSPEC;
	slot = sl->slot;
	st = bpf_map_lookup_elem(&fr_moq_state, &slot);
	if (!st || (first & 0x03) != 0x01 || skb->gso_segs > 1 || skb->gso_size) {
		count(FR_MQ_ERR);    /* cannot renumber: the packet would collide, drop it (QUIC retransmits) */
		return TC_ACT_SHOT;
	}
	if (bpf_ringbuf_query(&fr_moq_events, BPF_RB_AVAIL_DATA) > FR_MOQ_RING_SIZE - RB_SEND_HEADROOM) {
		count(FR_MQ_RINGBUF_FULL);
		return TC_ACT_SHOT;
	}
	/* the number sits at an odd offset of the datagram: update the checksum over the
	 * aligned 4 bytes around it (last CID byte, number, first frame byte) */
	if (bpf_skb_load_bytes(skb, off + FR_MOQ_CID_LEN, word, 4))
		return TC_ACT_SHOT;
	__builtin_memcpy(nword, word, 4);
	pn = __sync_fetch_and_add(&st->next_pn, 1);
	nword[1] = pn >> 8;
	nword[2] = pn;
	if (((p.family == FR_AF_INET6 || p.csum) &&
	     bpf_l4_csum_replace(skb, p.l4_off + offsetof(struct udphdr, check), *(__u32 *)word, *(__u32 *)nword,
				 4 | BPF_F_MARK_MANGLED_0)) ||
	    bpf_skb_store_bytes(skb, off + FR_MOQ_CID_LEN, nword, 4, 0)) {
		/* the number is spent: report it as a packet with no frames (never acknowledged);
		 * scratch is free here: no clone is being built on this CPU */
		struct scratch *s = scratch();

		if (s) {
			__builtin_memset(&s->sent, 0, offsetof(struct fr_moq_sent, frames));
			s->sent.kind = FR_MOQ_REC_SENT;
			s->sent.slot = slot;
			s->sent.gen = sl->gen;
			s->sent.pn = pn;
			emit_sent(s);
		}
		count(FR_MQ_ERR);
		return TC_ACT_SHOT;
	}
	rec.slot = slot;
	rec.gen = sl->gen;
	rec.bytes = p.udp_len - sizeof(struct udphdr);
	rec.pn = pn;
	rec.local_pn = ((__u16)word[1] << 8) | word[2];
	rec.time_ns = bpf_ktime_get_ns();
	if (bpf_ringbuf_output(&fr_moq_events, &rec, sizeof(rec), rb_lazy()))
		count(FR_MQ_RINGBUF_FULL);
	__sync_fetch_and_add(&st->renumbered, 1);
	count(FR_MQ_RENUMBERED);
	return TC_ACT_UNSPEC;
}

#endif /* FR_MOQ_RENUMBER_H */
