// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * UDP fan-out (TC ingress of the relay's upstream interface).
 *
 * Every valid UDP datagram addressed to the relay port is copied to each subscriber of
 * the active set: headers rewritten in place (MAC, IP, port, checksums updated
 * incrementally), bpf_clone_redirect to the subscriber's egress interface, the last copy
 * with bpf_redirect. One ring-buffer record per copy tells userspace what left.
 * What the kernel must not forward (GSO-merged skbs, oversize, fragments) goes up to the
 * relay's socket, where userspace forwards it; malformed packets are dropped. All counted.
 */
#include "fr_packet.h"
#include "fastrelay.h"
#include <linux/pkt_cls.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

FR_EXPORT_BTF(struct fr_fanout_event, fanout_event);
FR_EXPORT_BTF(enum fr_fanout_counter, fanout_counter);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fr_fanout_config);
} fr_fanout_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct fr_fanout_set);
} fr_fanout_sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fr_fanout_active SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct fr_addr);
	__type(value, __u8);
} fr_fanout_local SEC(".maps");

/* Never read by the program: userspace updates it only to wait for an RCU grace period. */
struct fr_sync_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} fr_fanout_sync_inner SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct fr_sync_inner);
} fr_fanout_sync SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FR_FC_MAX);
	__type(key, __u32);
	__type(value, __u64);
} fr_fanout_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} fr_fanout_events SEC(".maps");

/* Ring-buffer records are consumed on a timer; wake the reader only when this much waits. */
#define FR_WAKEUP_BYTES (256 * 1024)
/* Copies leave as the relay's own packets would: with a fresh TTL / hop limit. */
#define FR_TTL 64
#define FR_PACKET_HOST 0

static __always_inline void count_n(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&fr_fanout_stats, &idx);

	if (v)
		*v += n;
}

static __always_inline void count(__u32 idx)
{
	count_n(idx, 1);
}

struct fanout_ctx {
	struct __sk_buff *skb;
	struct fr_fanout_set *set;
	__u32 count;
	__u32 last_ifindex;
	__u32 copies;
	__u64 rb_flags;              /* wake the reader or not: decided once per packet */
	__u16 l3_off;
	__u16 l4_off;
	__u16 l3_len;
	__u8 family;
	__u8 v4_csum;                /* IPv4 UDP checksum present (non-zero) */
	__u32 csum_v6_flags;
	/* header values currently in the packet (the previous subscriber's) */
	__u8 addrs[32];              /* saddr, daddr (IPv4: first 4 bytes of each) */
	__be16 ports[2];             /* sport, dport */
};

/* Rewrite the packet in place for subscriber s; checksums follow incrementally. */
static __always_inline int rewrite(struct fanout_ctx *c, struct fr_fanout_sub *s)
{
	struct __sk_buff *skb = c->skb;
	__u8 macs[12];
	__be16 ports[2] = { s->src_port, s->dst_port };
	__u32 udp_csum = c->l4_off + offsetof(struct udphdr, check);
	/* never write 0 (IPv6: invalid; IPv4: "no checksum"): a zero result goes out as 0xffff */
	__u64 l4_flags = BPF_F_MARK_MANGLED_0;
	__s64 diff;

	__builtin_memcpy(macs, s->dst_mac, 6);
	__builtin_memcpy(macs + 6, s->src_mac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		return -1;

	if (c->family == FR_AF_INET) {
		__u32 old[2], new[2];

		__builtin_memcpy(&old[0], c->addrs, 4);
		__builtin_memcpy(&old[1], c->addrs + 16, 4);
		__builtin_memcpy(&new[0], s->src_ip, 4);
		__builtin_memcpy(&new[1], s->dst_ip, 4);
		diff = bpf_csum_diff(old, sizeof(old), new, sizeof(new), 0);
		if (diff < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, c->l3_off + offsetof(struct iphdr, check), 0, diff, 0))
			return -1;
		if (c->v4_csum &&
		    bpf_l4_csum_replace(skb, udp_csum, 0, diff, BPF_F_PSEUDO_HDR | l4_flags))
			return -1;
		if (bpf_skb_store_bytes(skb, c->l3_off + offsetof(struct iphdr, saddr), new, sizeof(new), 0))
			return -1;
		__builtin_memcpy(c->addrs, &new[0], 4);
		__builtin_memcpy(c->addrs + 16, &new[1], 4);
	} else {
		__u8 new[32];

		__builtin_memcpy(new, s->src_ip, 16);
		__builtin_memcpy(new + 16, s->dst_ip, 16);
		diff = bpf_csum_diff((__be32 *)c->addrs, sizeof(new), (__be32 *)new, sizeof(new), 0);
		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, udp_csum, 0, diff, BPF_F_PSEUDO_HDR | l4_flags | c->csum_v6_flags))
			return -1;
		if (bpf_skb_store_bytes(skb, c->l3_off + offsetof(struct ipv6hdr, saddr), new, sizeof(new), 0))
			return -1;
		__builtin_memcpy(c->addrs, new, sizeof(new));
	}

	if (c->family == FR_AF_INET6 || c->v4_csum) {
		diff = bpf_csum_diff((__be32 *)c->ports, sizeof(ports), (__be32 *)ports, sizeof(ports), 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, udp_csum, 0, diff, l4_flags))
			return -1;
	}
	if (bpf_skb_store_bytes(skb, c->l4_off, ports, sizeof(ports), 0))
		return -1;
	__builtin_memcpy(c->ports, ports, sizeof(ports));
	return 0;
}

static void emit(struct fanout_ctx *c, struct fr_fanout_sub *s)
{
	struct fr_fanout_event ev = { .sub_id = s->id, .bytes = c->l3_len };

	if (bpf_ringbuf_output(&fr_fanout_events, &ev, sizeof(ev), c->rb_flags))
		count(FR_FC_RINGBUF_FULL);
	c->copies++;
}

static long fanout_one(__u32 i, void *data)
{
	struct fanout_ctx *c = data;
	struct fr_fanout_sub *s;

	if (i >= FR_MAX_SUBSCRIBERS)
		return 1;
	s = &c->set->subs[i];
	if (rewrite(c, s)) {
		count(FR_FC_REDIRECT_ERR);
		return 0;
	}
	if (i + 1 == c->count) {
		/* last copy: no clone, the original itself is redirected on return */
		c->last_ifindex = s->ifindex;
		emit(c, s);
		return 1;
	}
	if (bpf_clone_redirect(c->skb, s->ifindex, 0)) {
		count(FR_FC_REDIRECT_ERR);
		return 0;
	}
	emit(c, s);
	return 0;
}

/* Is this datagram addressed to the relay (port, family and destination address)? */
static __always_inline int to_relay(struct fr_fanout_config *cfg, struct fr_udp_pkt *p)
{
	if (p->family != cfg->family)
		return 0;
	if (cfg->dst_any)
		return bpf_map_lookup_elem(&fr_fanout_local, p->daddr) != NULL;
	return fr_addr_eq(p->daddr, cfg->dst_addr);
}

/* Reset TTL / hop limit once, before the copies are made (they all share it). */
static __always_inline int fresh_ttl(struct __sk_buff *skb, struct fr_udp_pkt *p)
{
	__u8 ttl = FR_TTL;

	if (p->family == FR_AF_INET) {
		__be16 old, new;

		if (bpf_skb_load_bytes(skb, p->l3_off + offsetof(struct iphdr, ttl), &old, 2))
			return -1;
		new = old;
		*(__u8 *)&new = ttl;     /* ttl is the first byte of the (ttl, protocol) word */
		if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check), old, new, 2))
			return -1;
		return bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct iphdr, ttl), &ttl, 1, 0);
	}
	return bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct ipv6hdr, hop_limit), &ttl, 1,
				   BPF_F_RECOMPUTE_CSUM);
}

/*
 * Returns TC_ACT_UNSPEC (next program / the stack) for everything that is not ours or
 * that userspace must handle, TC_ACT_SHOT for what is dropped, and a redirect for copies.
 */
SEC("tc")
int fr_udp_fanout(struct __sk_buff *skb)
{
	struct fanout_ctx c = {};
	struct fr_udp_pkt p = {};
	struct fr_fanout_config *cfg;
	__u32 zero = 0, *active;

	cfg = bpf_map_lookup_elem(&fr_fanout_cfg, &zero);
	if (!cfg || !cfg->port || skb->pkt_type != FR_PACKET_HOST)
		return TC_ACT_UNSPEC;

	switch (fr_parse_udp(skb, &p)) {
	case FR_PARSE_OTHER:
		return TC_ACT_UNSPEC;
	case FR_PARSE_MALFORMED:
		/* only the relay's traffic is judged; the stack handles the rest */
		if (p.dport != cfg->port || !to_relay(cfg, &p))
			return TC_ACT_UNSPEC;
		count(FR_FC_RX);
		count(FR_FC_DROP_MALFORMED);
		return TC_ACT_SHOT;
	case FR_PARSE_IRREGULAR:
		if (p.dport == cfg->port && to_relay(cfg, &p)) {
			count(FR_FC_RX);
			count(FR_FC_PASS_IRREGULAR);
		}
		return TC_ACT_UNSPEC;
	case FR_PARSE_OK:
		break;
	}
	if (!to_relay(cfg, &p))
		return TC_ACT_UNSPEC;
	if (p.fragment) {
		/* the port is only in the first fragment: let the stack reassemble */
		count(FR_FC_PASS_FRAGMENT);
		return TC_ACT_UNSPEC;
	}
	if (p.dport != cfg->port)
		return TC_ACT_UNSPEC;
	count(FR_FC_RX);

	if (cfg->src_filter && !fr_addr_eq(p.saddr, cfg->src_addr)) {
		count(FR_FC_DROP_SOURCE);
		return TC_ACT_SHOT;
	}
	if (skb->gso_segs > 1 || skb->gso_size) {
		count(FR_FC_PASS_GSO);
		return TC_ACT_UNSPEC;
	}
	if (p.l3_len > cfg->max_len) {
		count(FR_FC_PASS_OVERSIZE);
		return TC_ACT_UNSPEC;
	}

	active = bpf_map_lookup_elem(&fr_fanout_active, &zero);
	if (!active)
		return TC_ACT_UNSPEC;
	c.set = bpf_map_lookup_elem(&fr_fanout_sets, active);
	if (!c.set)
		return TC_ACT_UNSPEC;
	c.count = c.set->count;
	if (c.count == 0 || c.count > FR_MAX_SUBSCRIBERS) {
		count(FR_FC_DROP_NO_SUBS);
		return TC_ACT_SHOT;
	}
	if (fresh_ttl(skb, &p)) {
		count(FR_FC_REDIRECT_ERR);
		return TC_ACT_SHOT;
	}

	c.skb = skb;
	c.family = p.family;
	c.l3_off = p.l3_off;
	c.l4_off = p.l4_off;
	c.l3_len = p.l3_len;
	c.v4_csum = p.csum != 0;
	c.csum_v6_flags = cfg->csum_v6_flags;
	__builtin_memcpy(c.addrs, p.saddr, 16);
	__builtin_memcpy(c.addrs + 16, p.daddr, 16);
	c.ports[0] = p.sport;
	c.ports[1] = p.dport;

	count(FR_FC_FANNED);
	c.rb_flags = bpf_ringbuf_query(&fr_fanout_events, BPF_RB_AVAIL_DATA) >= FR_WAKEUP_BYTES ?
		     BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	bpf_loop(c.count, fanout_one, &c, 0);
	count_n(FR_FC_COPIES, c.copies);
	if (!c.last_ifindex)
		return TC_ACT_SHOT;
	return bpf_redirect(c.last_ifindex, 0);
}
