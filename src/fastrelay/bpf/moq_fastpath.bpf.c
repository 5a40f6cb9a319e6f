// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * MoQT relay fast path: two TC programs and a syscall program sharing one set of maps.
 * Each entry below only routes a packet; the stages are in moq/ (maps.h says how they are
 * written so that the verifier checks each once).
 *
 * fr_moq_ingress (TC ingress, interfaces publishers reach the relay on): a 1-RTT packet of a
 * publisher connection (known destination connection id, validated source address, plaintext
 * mode) is parsed (moq/parse.h), its frames tied to tracks (moq/classify.h) and cloned once per
 * kernel-path subscriber of each track (moq/clone.h); the original goes up to the relay's
 * socket, so the upstream connection acknowledges it and the cache fills. A subscriber's
 * ACK-only packet is read and dropped (moq/ack.h).
 *
 * fr_moq_egress (TC egress, interfaces subscribers are reached on): a clone becomes a packet of
 * the subscriber's connection (moq/build.h, moq/rewrite.h) and is reported for registration; a
 * packet userspace sent on such a connection is renumbered from the shared counter
 * (moq/renumber.h).
 *
 * fr_moq_take (syscall): userspace's atomic changes to the shared counters.
 *
 * fr_moq_recover (syscall): RFC 9002 loss recovery and NewReno of a connection (moq/recovery.h):
 * userspace's calls (set up, its own packets sent, ACKs it read, the timer); lost ranges and the
 * next timer come back. On kernel-recovery connections the egress registers the packets it
 * builds and the ingress applies the ACK-only packets it reads, in the same state.
 */
#include "moq/maps.h"
#include "moq/parse.h"
#include "moq/classify.h"
#include "moq/clone.h"
#include "moq/ack.h"
#include "moq/build.h"
#include "moq/renumber.h"
#include "moq/recovery.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

FR_EXPORT_BTF(enum fr_moq_limits, moq_limits);
FR_EXPORT_BTF(struct fr_moq_sent, moq_sent);
FR_EXPORT_BTF(struct fr_moq_renumbered, moq_renumbered);
FR_EXPORT_BTF(struct fr_moq_handover, moq_handover);
FR_EXPORT_BTF(struct fr_moq_ack, moq_ack);
FR_EXPORT_BTF(struct fr_moq_lost, moq_lost);
FR_EXPORT_BTF(struct fr_moq_timer, moq_timer);
FR_EXPORT_BTF(enum fr_moq_lost_flags, moq_lost_flags);
FR_EXPORT_BTF(enum fr_moq_record_kind, moq_record_kind);
FR_EXPORT_BTF(enum fr_moq_handover_reason, moq_handover_reason);
FR_EXPORT_BTF(enum fr_moq_counter, moq_counter);
FR_EXPORT_BTF(enum fr_moq_take_op, moq_take_op);
FR_EXPORT_BTF(enum fr_moq_dstream_state, moq_dstream_state);
FR_EXPORT_BTF(enum fr_moq_ustream_kind, moq_ustream_kind);
FR_EXPORT_BTF(enum fr_moq_lr_op, moq_lr_op);
FR_EXPORT_BTF(enum fr_moq_lr_status, moq_lr_status);
FR_EXPORT_BTF(enum fr_moq_lr_flags, moq_lr_flags);
FR_EXPORT_BTF(enum fr_moq_pkt_flags, moq_pkt_flags);
FR_EXPORT_BTF(enum fr_moq_pkt_state, moq_pkt_state);
FR_EXPORT_BTF(struct fr_moq_recover_args, moq_recover_args);

SEC("tc")
int fr_moq_ingress(struct __sk_buff *skb)
{
	struct fr_udp_pkt p = {};
	struct fr_moq_config *cfg;
	struct fr_moq_upconn *up;
	struct fr_moq_cid cid;
	struct scratch *s;
	__u32 zero = 0, plen, clones;
	__u8 first;

	cfg = bpf_map_lookup_elem(&fr_moq_cfg, &zero);
	if (!cfg || !cfg->enabled || skb->pkt_type != FR_PACKET_HOST)
		return TC_ACT_UNSPEC;
	if (fr_parse_udp(skb, &p) != FR_PARSE_OK || p.fragment || p.dport != cfg->port)
		return TC_ACT_UNSPEC;
	plen = p.udp_len - sizeof(struct udphdr);
	if (plen < SHORT_HDR_LEN + FR_MOQ_TAG_LEN)
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p.l4_off + sizeof(struct udphdr), &first, 1) ||
	    (first & 0xc0) != 0x40)                       /* not a short-header packet */
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, p.l4_off + sizeof(struct udphdr) + 1, &cid, sizeof(cid)))
		return TC_ACT_UNSPEC;
	up = bpf_map_lookup_elem(&fr_moq_up, &cid);
	if (!up)
		return fr_moq_absorb_ack(skb, &p, &cid, plen, first);
	count(FR_MQ_RX);
	if (p.family != up->family || p.sport != up->peer_port || !fr_addr_eq(p.saddr, up->peer_ip)) {
		count(FR_MQ_PASS_SPOOFED);
		return TC_ACT_UNSPEC;
	}
	if (plen > FR_MOQ_MAX_PAYLOAD || skb->gso_segs > 1 || skb->gso_size) {
		count(FR_MQ_PASS_OVERSIZE);
		return TC_ACT_UNSPEC;
	}
	if ((first & 0x03) != 0x01) {                    /* fastrelay peers send 2-byte numbers */
		count(FR_MQ_PASS_UNPARSED);
		return TC_ACT_UNSPEC;
	}
	s = scratch();
	plen = BOUNDED(plen, 0x7ff);                     /* bounds the verifier sees at the call */
	if (!s || plen < 1 || bpf_skb_load_bytes(skb, p.l4_off + sizeof(struct udphdr), s->in, plen))
		return TC_ACT_UNSPEC;
	if (*(__u64 *)&s->in[BOUNDED(plen - FR_MOQ_TAG_LEN, MASK)] || *(__u64 *)&s->in[BOUNDED(plen - 8, MASK)]) {
		count(FR_MQ_PASS_BAD_TAG);                   /* not identity protection */
		return TC_ACT_UNSPEC;
	}
	*(__u32 *)&s->in[BOUNDED(plen, MASK)] = 0;       /* zero padding for checksums */
	s->up = up->id;
	s->payload_len = plen;
	s->armed = 0;
	if (parse_frames(s, plen - FR_MOQ_TAG_LEN)) {
		count(FR_MQ_PASS_UNPARSED);
		return TC_ACT_UNSPEC;
	}
	if (!classify_frames(s))
		return TC_ACT_UNSPEC;
	clones = fr_moq_fan_out(skb);
	if (clones) {
		count(FR_MQ_FANNED);
		count_n(FR_MQ_CLONES, clones);
	}
	return TC_ACT_UNSPEC;        /* the original goes up to the relay's socket */
}

SEC("tc")
int fr_moq_egress(struct __sk_buff *skb)
{
	struct fr_moq_config *cfg;
	struct scratch *s;
	__u32 zero = 0, slot;

	cfg = bpf_map_lookup_elem(&fr_moq_cfg, &zero);
	if (!cfg || !cfg->enabled)
		return TC_ACT_UNSPEC;
	s = scratch();
	if (s && s->armed) {
		slot = s->armed - 1;
		s->armed = 0;            /* only this clone: a nested packet is not ours */
		return fr_moq_build_clone(skb, slot);
	}
	return fr_moq_renumber(skb);
}

/* ---------------------------------------------------------------- userspace's atomic changes */
SEC("syscall")
int fr_moq_take(struct fr_moq_take_args *a)
{
	struct fr_moq_state *st;
	__u32 slot = a->slot;
	__u64 old;

	st = bpf_map_lookup_elem(&fr_moq_state, &slot);
	if (!st)
		return -1;
	switch (a->op) {
	case FR_MOQ_TAKE_PN:
		a->result = __sync_fetch_and_add(&st->next_pn, a->value);
		return 0;
	case FR_MOQ_TAKE_STREAM:
		a->result = __sync_fetch_and_add(&st->next_stream, 4 * a->value);
		return 0;
	case FR_MOQ_ADD_BUDGET:
		a->result = __sync_fetch_and_add(&st->budget, a->value);
		return 0;
	case FR_MOQ_ADD_CREDIT:
		a->result = __sync_fetch_and_add(&st->credit, a->value);
		return 0;
	case FR_MOQ_SET_PN:
		old = st->next_pn;
		for (int i = 0; i < 16 && old < (__u64)a->value; i++) {
			__u64 seen = __sync_val_compare_and_swap(&st->next_pn, old, a->value);

			if (seen == old)
				break;
			old = seen;
		}
		a->result = old;
		return 0;
	}
	return -1;
}

/* ---------------------------------------------------------------- loss recovery */
SEC("syscall")
int fr_moq_recover(struct fr_moq_recover_args *a)
{
	struct fr_moq_recover_args *io;
	__u32 slot = a->slot;
	int ret;

	io = bpf_map_lookup_elem(&fr_moq_rec_io, &slot);
	if (!io) {
		a->status = FR_MOQ_LR_E_SLOT;
		return FR_MOQ_LR_E_SLOT;
	}
	/* the stages work on the slot's copy: a syscall program's context cannot be passed on */
	__builtin_memcpy(io, a, offsetof(struct fr_moq_recover_args, status));
	ret = lr_run_locked(slot, io->op);
	io->status = ret;
	__builtin_memcpy(&a->status, &io->status,
			 sizeof(*a) - offsetof(struct fr_moq_recover_args, status));
	return ret;
}
