/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress stage 3: put the built payload (scratch.out) into the clone and rewrite its headers
 * for the subscriber connection: MACs, addresses, ports, UDP/IP lengths, a fresh TTL, and the
 * checksums, updated incrementally (the payload's difference, then each header change).
 */
#ifndef FR_MOQ_REWRITE_H
#define FR_MOQ_REWRITE_H

#include "moq/maps.h"

/* The ones'-complement sum of buf[0, len) (len rounded up to 4; the buffer is zero-padded),
 * added to seed, or subtracted when `negate`. Negative on helper failure. */
static __always_inline __s64 sum_region(__u8 *buf, __u32 len, __s64 seed, int negate)
{
	__u32 n = (len + 3) & ~3U, k;
	__s64 sum = seed;

#pragma unroll
	for (k = 0; k < 4; k++) {
		__u32 chunk;

		if (k * 512 >= n)
			break;
		chunk = n - k * 512;
		if (chunk > 512)
			chunk = 512;
		chunk &= 0x3fc;
		if (negate)
			sum = bpf_csum_diff((__be32 *)(buf + k * 512), chunk, NULL, 0, sum);
		else
			sum = bpf_csum_diff(NULL, 0, (__be32 *)(buf + k * 512), chunk, sum);
		if (sum < 0)
			return sum;
	}
	return sum;
}

static __always_inline int rewrite_ipv4(struct __sk_buff *skb, struct fr_udp_pkt *p, struct fr_moq_conn *conn,
					__u32 len, __u32 csum_off, __u64 pflags)
{
	__u32 oaddr[2], naddr[2];
	__be16 olen = bpf_htons(p->l3_len), nlen = bpf_htons(20 + 8 + len);
	__be16 ottl, nttl;
	__s64 diff;

	__builtin_memcpy(&oaddr[0], p->saddr, 4);
	__builtin_memcpy(&oaddr[1], p->daddr, 4);
	__builtin_memcpy(&naddr[0], conn->src_ip, 4);
	__builtin_memcpy(&naddr[1], conn->dst_ip, 4);
	diff = bpf_csum_diff(oaddr, 8, naddr, 8, 0);
	if (diff < 0 || bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), 0, diff, 0))
		return -1;
	if (p->csum && bpf_l4_csum_replace(skb, csum_off, 0, diff, pflags))
		return -1;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), olen, nlen, 2) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, tot_len), &nlen, 2, 0))
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), &ottl, 2))
		return -1;
	nttl = ottl;
	*(__u8 *)&nttl = FR_TTL;
	if (bpf_l3_csum_replace(skb, ETH_HLEN + offsetof(struct iphdr, check), ottl, nttl, 2) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, ttl), &nttl, 2, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct iphdr, saddr), naddr, 8, 0))
		return -1;
	return 0;
}

static __always_inline int rewrite_ipv6(struct __sk_buff *skb, struct fr_udp_pkt *p, struct fr_moq_conn *conn,
					__u32 len, __u32 csum_off, __u64 pflags)
{
	__u8 oaddr[32], naddr[32];
	__be16 plen6 = bpf_htons(8 + len);
	__u8 hl = FR_TTL;
	__s64 diff;

	__builtin_memcpy(oaddr, p->saddr, 16);
	__builtin_memcpy(oaddr + 16, p->daddr, 16);
	__builtin_memcpy(naddr, conn->src_ip, 16);
	__builtin_memcpy(naddr + 16, conn->dst_ip, 16);
	diff = bpf_csum_diff((__be32 *)oaddr, 32, (__be32 *)naddr, 32, 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, pflags))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, payload_len), &plen6, 2, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, hop_limit), &hl, 1, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), naddr, 32, 0))
		return -1;
	return 0;
}

/* Make the clone (parsed as `p`) carry scratch.out[0, len) as a packet of connection `slot`;
 * 0, or -1 if a helper failed (the clone is then dropped). */
GLOBAL int fr_moq_rewrite(struct __sk_buff *skb, struct fr_udp_pkt *p, __u32 slot, __u32 len)
{
	struct scratch *s = scratch();
	struct fr_moq_conn *conn = bpf_map_lookup_elem(&fr_moq_conns, &slot);
	struct fr_moq_config *cfg;
	__u32 zero = 0, l4, csum_off, wlen;
	__u64 flags0 = BPF_F_MARK_MANGLED_0, pflags;
	__be16 old[2], new[2], ports[2], oports[2];
	__u8 macs[12];
	__s64 diff;
	int v6;

	cfg = bpf_map_lookup_elem(&fr_moq_cfg, &zero);
	if (!skb || !p || !s || !conn || !cfg || len < 1 || len > FR_MOQ_MAX_PAYLOAD)
		return -1;
	v6 = p->family == FR_AF_INET6;
	l4 = p->l4_off;
	csum_off = l4 + offsetof(struct udphdr, check);
	pflags = BPF_F_PSEUDO_HDR | flags0 | (v6 ? cfg->csum_v6_flags : 0);

	/* the payload: the old one's sum out, the new one's in */
	diff = sum_region(s->in, s->payload_len, 0, 1);
	if (diff >= 0)
		diff = sum_region(s->out, len, diff, 0);
	if (diff < 0 || bpf_skb_change_tail(skb, l4 + sizeof(struct udphdr) + len, 0))
		return -1;
	wlen = BOUNDED(len, MASK);
	if (wlen < 1 || bpf_skb_store_bytes(skb, l4 + sizeof(struct udphdr), s->out, wlen, 0))
		return -1;
	if ((v6 || p->csum) && bpf_l4_csum_replace(skb, csum_off, 0, diff, flags0))
		return -1;

	old[0] = bpf_htons(s->payload_len + 8);
	new[0] = bpf_htons(len + 8);
	old[1] = new[1] = 0;
	ports[0] = conn->src_port;
	ports[1] = conn->dst_port;
	oports[0] = p->sport;
	oports[1] = p->dport;
	if (v6 || p->csum) {
		/* UDP length: once in the header, once in the pseudo header */
		diff = bpf_csum_diff((__be32 *)old, 4, (__be32 *)new, 4, 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, flags0) ||
		    bpf_l4_csum_replace(skb, csum_off, 0, diff, pflags))
			return -1;
		diff = bpf_csum_diff((__be32 *)oports, 4, (__be32 *)ports, 4, 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, flags0))
			return -1;
	}
	if (bpf_skb_store_bytes(skb, l4, ports, 4, 0) ||
	    bpf_skb_store_bytes(skb, l4 + offsetof(struct udphdr, len), &new[0], 2, 0))
		return -1;
	if (v6 ? rewrite_ipv6(skb, p, conn, len, csum_off, pflags) : rewrite_ipv4(skb, p, conn, len, csum_off, pflags))
		return -1;
	__builtin_memcpy(macs, conn->dst_mac, 6);
	__builtin_memcpy(macs + 6, conn->src_mac, 6);
	return bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) ? -1 : 0;
}

#endif /* FR_MOQ_REWRITE_H */
