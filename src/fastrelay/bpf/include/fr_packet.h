/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing shared by fastrelay's TC programs (kernel side only). */
#ifndef FR_PACKET_H
#define FR_PACKET_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define FR_AF_INET 2
#define FR_AF_INET6 10
#define FR_IP_MF 0x2000
#define FR_IP_OFFSET 0x1fff

/* Where the UDP datagram of an skb sits, with lengths checked against the skb. */
struct fr_udp_pkt {
	__u8 family;
	__u8 fragment;               /* IPv4 fragment: not parsed further */
	__u16 l3_off;
	__u16 l4_off;
	__u16 l3_len;                /* from the IP header (tot_len / 40 + payload_len) */
	__u16 udp_len;               /* from the UDP header */
	__be16 sport;
	__be16 dport;
	__u16 csum;                  /* UDP checksum as found (0 = none, IPv4 only) */
	__u8 saddr[16] __attribute__((aligned(8)));   /* compared 8 bytes at a time (fr_addr_eq) */
	__u8 daddr[16];
};

enum fr_parse_result {
	FR_PARSE_OK = 0,
	FR_PARSE_OTHER,              /* not IPv4/IPv6 UDP: none of our business */
	FR_PARSE_MALFORMED,          /* lengths inconsistent with the skb */
	FR_PARSE_IRREGULAR,          /* legal but not exact (trailing bytes): leave it to the stack */
};

/* Two 16-byte addresses equal (IPv4 in the first 4 bytes, the rest zero). An explicit compare:
 * clang 14 leaves __builtin_memcmp as a call to an extern the kernel does not have. */
static __always_inline int fr_addr_eq(const __u8 *a, const __u8 *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1];
}

/*
 * Parse Ethernet + IPv4/IPv6 + UDP. Every length read from the packet is checked
 * against the skb before it is trusted. IPv6 extension headers are not followed
 * (FR_PARSE_OTHER), IPv4 options are skipped.
 */
static __always_inline enum fr_parse_result fr_parse_udp(struct __sk_buff *skb, struct fr_udp_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp;
	__u32 wire_l3 = skb->len - ETH_HLEN, hdr_len;

	if ((void *)(eth + 1) > end)
		return FR_PARSE_OTHER;
	p->l3_off = ETH_HLEN;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > end || ip->version != 4 || ip->protocol != IPPROTO_UDP)
			return FR_PARSE_OTHER;
		p->family = FR_AF_INET;
		hdr_len = ip->ihl * 4;
		p->l3_len = bpf_ntohs(ip->tot_len);
		p->fragment = (ip->frag_off & bpf_htons(FR_IP_MF | FR_IP_OFFSET)) != 0;
		__builtin_memcpy(p->saddr, &ip->saddr, 4);
		__builtin_memcpy(p->daddr, &ip->daddr, 4);
		if (hdr_len < sizeof(*ip))
			return FR_PARSE_MALFORMED;
		if (p->fragment)
			return p->l3_len > wire_l3 ? FR_PARSE_MALFORMED : FR_PARSE_OK;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end || ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
			return FR_PARSE_OTHER;
		p->family = FR_AF_INET6;
		hdr_len = sizeof(*ip6);
		p->l3_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
	} else {
		return FR_PARSE_OTHER;
	}

	/* ports first, so a malformed packet can still be attributed to its port */
	p->l4_off = ETH_HLEN + (hdr_len & 0x3f);
	udp = data + p->l4_off;
	if ((void *)(udp + 1) > end)
		return FR_PARSE_MALFORMED;
	p->sport = udp->source;
	p->dport = udp->dest;
	p->csum = udp->check;
	p->udp_len = bpf_ntohs(udp->len);

	if (p->l3_len > wire_l3 || p->l3_len < hdr_len + sizeof(*udp))
		return FR_PARSE_MALFORMED;       /* truncated, or shorter than its headers */
	if (p->udp_len > p->l3_len - hdr_len || p->udp_len < sizeof(*udp))
		return FR_PARSE_MALFORMED;
	if (p->family == FR_AF_INET6 && p->csum == 0)
		return FR_PARSE_MALFORMED;       /* a zero UDP checksum is invalid over IPv6 */
	/* bytes after the UDP datagram or after the IP packet: the stack trims them */
	if (p->udp_len != p->l3_len - hdr_len || p->l3_len != wire_l3)
		return FR_PARSE_IRREGULAR;
	if (p->family == FR_AF_INET && hdr_len != sizeof(struct iphdr))
		return FR_PARSE_IRREGULAR;       /* IPv4 options: not ours to copy, the stack decides */
	return FR_PARSE_OK;
}

#endif /* FR_PACKET_H */
