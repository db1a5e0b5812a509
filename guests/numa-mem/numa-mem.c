/*
 * numa-mem: a per-node page allocator driven by the host's dynamic memory
 * service (pykvm/bus/services/dynmem.py), running a workload that fills one
 * node while the other idles.
 *
 * The NUMA layout comes from the boot info's NUMA block. Each node's pages
 * (boot RAM, later hot-added ranges) are tracked one byte per page: free,
 * used (holds workload data), ballooned (the host has it) or reserved (the
 * kernel, firmware area, this allocator's own tables). Every used page holds
 * a pattern and its checksum is kept; all are verified at the end.
 *
 * Command line (sizes in MiB):
 *   warm=N     fill N MiB of every node first (0: all its free pages), then
 *              the idle nodes free all but keep=K MiB of it on node 0 (so
 *              their free pages have really been touched: ballooning them
 *              must lower the host's RSS)                         [default 0]
 *   keep=K     MiB node 0 keeps (checksummed) after warming      [default 1]
 *   grow=G     MiB node `busy` ends up holding                    [default 48]
 *   busy=B     the node that grows                                [default 1]
 *   step=S     MiB allocated per step                             [default 2]
 *   words=W    64-bit words written (and checksummed) per page, spread
 *              evenly over it (1..512, a power of two)           [default 8;
 *              guest code is slow under nested KVM, every page is touched anyway]
 *   settle=R   report rounds to wait at the end for the balancer  [default 100]
 *   fast=1     one word per page (written, checksummed), and idle nodes are
 *              warmed by one write per page without taking them: for the
 *              benchmark's GiBs (each page is still really touched)
 *   park=N     then disconnect the bus, print "numa-mem: parked" and spin
 *              N thousand loops before verifying (time for a save) [default 0]
 *
 * Serial output ends with, e.g.:
 *   "numa-mem: node 0: ... ballooned 6144 pages, hot-added 0 pages\n"
 *   "numa-mem: checksums ok: 12544 pages\n"
 * then power-off. Exit codes (debug-exit): 2 no NUMA block, 3 no bus or no
 * dynamic memory offer, 4 checksum mismatch, 5 the allocator ran out and the
 * host never grew the node, 6 the channel broke.
 */
#include "rt.h"
#include "bus.h"

#define PAGE 4096ull
#define MAX_SPANS 12

enum { P_FREE = 0, P_USED = 1, P_BALLOON = 2, P_RESERVED = 3 };

struct span {
    uint64_t pfn, npages;
    uint8_t *state;
    uint32_t *csum;
};

struct node {
    struct span spans[MAX_SPANS];
    int nspans;
    uint64_t hot_pfn, hot_pages;      /* the reserved hot-add range */
    uint64_t total, used, reserved, ballooned, hotadded;
    uint64_t unmet;                   /* pages asked for and not given */
    uint64_t cursor;                  /* where the next free-page search starts (span-relative hint) */
};

static struct node nodes[PYKVM_NUMA_MAX_NODES];
static uint32_t nr_nodes;
static uint32_t words = 8;
static int fast;
static uint8_t *bump;                 /* allocator tables, carved from node 0 after the image */
static struct bus_channel *ch;
static uint8_t rx[4096] __attribute__((aligned(8)));
static uint8_t tx[sizeof(struct pykvm_dm_msg) + PYKVM_DM_MAX_RANGES * sizeof(struct pykvm_dm_range)]
    __attribute__((aligned(8)));
static uint32_t seq;
static uint64_t balloon_reqs, hotadd_msgs, unballoon_msgs;

extern char __image_end[];

static void *take(uint64_t n)
{
    void *p = bump;
    bump += (n + 7) & ~7ull;
    memset(p, 0, n);
    return p;
}

static uint64_t pattern(uint64_t pfn, uint32_t i)
{
    uint64_t x = pfn * 0x9e3779b97f4a7c15ull + i * 0xbf58476d1ce4e5b9ull + 0x1234567;
    return x ^ (x >> 29);
}

static uint32_t fill_page(uint64_t pfn)
{
    volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)(pfn * PAGE);
    uint64_t sum = 0;

    uint32_t stride = 512 / words;
    for (uint32_t i = 0; i < words; i++) {
        uint64_t v = pattern(pfn, i);
        p[i * stride] = v;
        sum += v;
    }
    return (uint32_t)(sum ^ (sum >> 32));
}

static uint32_t sum_page(uint64_t pfn)
{
    volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)(pfn * PAGE);
    uint64_t sum = 0;
    uint32_t stride = 512 / words;
    for (uint32_t i = 0; i < words; i++)
        sum += p[i * stride];
    return (uint32_t)(sum ^ (sum >> 32));
}

static void add_span(struct node *n, uint64_t pfn, uint64_t npages, uint64_t reserved_below_pfn)
{
    struct span *s = &n->spans[n->nspans++];
    s->pfn = pfn;
    s->npages = npages;
    s->state = take(npages);
    s->csum = take(npages * 4);
    for (uint64_t i = 0; i < npages; i++)
        if (pfn + i < reserved_below_pfn) {
            s->state[i] = P_RESERVED;
            n->reserved++;
        }
    n->total += npages;
}

/* Allocate `pages` on node n; returns how many it got. */
static uint64_t alloc_pages(struct node *n, uint64_t pages)
{
    uint64_t got = 0;
    for (int k = 0; k < n->nspans && got < pages; k++) {
        struct span *s = &n->spans[k];
        for (uint64_t i = 0; i < s->npages && got < pages; i++)
            if (s->state[i] == P_FREE) {
                s->state[i] = P_USED;
                s->csum[i] = fill_page(s->pfn + i);
                got++;
            }
    }
    n->used += got;
    return got;
}

/* Write every free page of node n once (so the host backs it), without taking it. */
static void touch_free(struct node *n)
{
    for (int k = 0; k < n->nspans; k++) {
        struct span *s = &n->spans[k];
        for (uint64_t i = 0; i < s->npages; i++)
            if (s->state[i] == P_FREE)
                *(volatile uint64_t *)(uintptr_t)((s->pfn + i) * PAGE) = 0x5a5a5a5a5a5a5a5aull;
    }
}

/* Free used pages of node n, keeping the first `keep`. */
static void free_all_but(struct node *n, uint64_t keep)
{
    for (int k = 0; k < n->nspans; k++) {
        struct span *s = &n->spans[k];
        for (uint64_t i = 0; i < s->npages; i++)
            if (s->state[i] == P_USED) {
                if (keep) {
                    keep--;
                    continue;
                }
                s->state[i] = P_FREE;
                n->used--;
            }
    }
}

static struct span *span_of(struct node *n, uint64_t pfn, uint64_t count)
{
    for (int k = 0; k < n->nspans; k++) {
        struct span *s = &n->spans[k];
        if (pfn >= s->pfn && count <= s->npages && pfn - s->pfn <= s->npages - count)
            return s;
    }
    return 0;
}

static uint64_t free_pages(const struct node *n)
{
    return n->total - n->used - n->reserved - n->ballooned;
}

static int send(const void *msg, uint32_t len)
{
    if (bus_send(ch, msg, len, ++seq)) {
        printf("numa-mem: send failed\n");
        exit_code(6);
    }
    return 0;
}

static void report(void)
{
    struct pykvm_dm_msg *m = (struct pykvm_dm_msg *)tx;
    memset(m, 0, sizeof(*m));
    m->op = PYKVM_DM_OP_STATUS;
    m->node = nr_nodes;
    m->req = seq;
    struct pykvm_dm_node_status *st = (struct pykvm_dm_node_status *)(m + 1);
    for (uint32_t i = 0; i < nr_nodes; i++) {
        struct node *n = &nodes[i];
        uint64_t total = n->total - n->ballooned;
        uint64_t committed = n->used + n->reserved;
        st[i].node = i;
        st[i].total = total;
        st[i].committed = committed;
        st[i].free = free_pages(n);
        uint64_t p = total ? (committed + n->unmet) * 1000 / total : 0;
        st[i].pressure = p > PYKVM_DM_PRESSURE_MAX ? PYKVM_DM_PRESSURE_MAX : (uint32_t)p;
    }
    send(tx, sizeof(*m) + nr_nodes * sizeof(*st));
}

/* The host asks for `want` pages of node ni: hand over free ones as ranges. */
static void do_balloon(uint32_t ni, uint32_t req, uint64_t want)
{
    struct node *n = &nodes[ni];
    struct pykvm_dm_msg *m = (struct pykvm_dm_msg *)tx;
    struct pykvm_dm_range *r = (struct pykvm_dm_range *)(m + 1);
    uint32_t nr = 0;
    balloon_reqs++;
    for (int k = n->nspans - 1; k >= 0 && want; k--) {       /* from the top: hot-added memory goes first */
        struct span *s = &n->spans[k];
        for (uint64_t i = s->npages; i-- > 0 && want;) {
            if (s->state[i] != P_FREE)
                continue;
            s->state[i] = P_BALLOON;
            n->ballooned++;
            want--;
            uint64_t pfn = s->pfn + i;
            if (nr && r[nr - 1].pfn == pfn + 1) {
                r[nr - 1].pfn = pfn;
                r[nr - 1].count++;
            } else {
                if (nr == PYKVM_DM_MAX_RANGES) {
                    memset(m, 0, sizeof(*m));
                    m->op = PYKVM_DM_OP_BALLOON_RESP;
                    m->node = ni;
                    m->req = req;
                    m->nr_ranges = nr;
                    send(tx, sizeof(*m) + nr * sizeof(*r));
                    nr = 0;
                }
                r[nr].pfn = pfn;
                r[nr].count = 1;
                nr++;
            }
        }
    }
    memset(m, 0, sizeof(*m));
    m->op = PYKVM_DM_OP_BALLOON_RESP;
    m->node = ni;
    m->req = req;
    m->flags = PYKVM_DM_FLAG_LAST;
    m->nr_ranges = nr;
    send(tx, sizeof(*m) + nr * sizeof(*r));
}

static void do_unballoon(uint32_t ni, const struct pykvm_dm_range *r, uint32_t nr)
{
    struct node *n = &nodes[ni];
    unballoon_msgs++;
    for (uint32_t j = 0; j < nr; j++) {
        struct span *s = span_of(n, r[j].pfn, r[j].count);
        if (!s)
            continue;
        for (uint64_t i = 0; i < r[j].count; i++) {
            uint8_t *st = &s->state[r[j].pfn - s->pfn + i];
            if (*st == P_BALLOON) {
                *st = P_FREE;
                n->ballooned--;
            }
        }
    }
}

static void do_hotadd(uint32_t ni, uint32_t req, const struct pykvm_dm_range *r, uint32_t nr)
{
    struct node *n = &nodes[ni];
    struct pykvm_dm_msg ack = { PYKVM_DM_OP_HOTADD_ACK, ni, req, 0, PYKVM_BUS_E_INVALID, 0, 0 };
    hotadd_msgs++;
    if (nr == 1 && n->nspans < MAX_SPANS && r->pfn >= n->hot_pfn && r->count <= n->hot_pages &&
        r->pfn - n->hot_pfn <= n->hot_pages - r->count && !span_of(n, r->pfn, 1)) {
        add_span(n, r->pfn, r->count, 0);
        n->hotadded += r->count;       /* unmet falls when the workload really takes these pages */
        ack.pages = PYKVM_BUS_OK;
    }
    send(&ack, sizeof(ack));
}

/* Handle what the host sent; returns how many messages. */
static int service(void)
{
    int handled = 0;
    for (;;) {
        int len = bus_recv(ch, rx, sizeof(rx));
        if (len == 0)
            return handled;
        if (len < 0) {
            printf("numa-mem: channel broke (%d)\n", len);
            exit_code(6);
        }
        uint32_t plen;
        const struct pykvm_dm_msg *m = bus_payload(rx, &plen);
        if (plen < sizeof(*m) || m->node >= nr_nodes)
            continue;
        const struct pykvm_dm_range *r = (const struct pykvm_dm_range *)(m + 1);
        uint32_t nr = m->nr_ranges;
        if (nr > (plen - sizeof(*m)) / sizeof(*r))
            nr = (plen - sizeof(*m)) / sizeof(*r);
        if (m->op == PYKVM_DM_OP_BALLOON)
            do_balloon(m->node, m->req, m->pages);
        else if (m->op == PYKVM_DM_OP_UNBALLOON)
            do_unballoon(m->node, r, nr);
        else if (m->op == PYKVM_DM_OP_HOTADD)
            do_hotadd(m->node, m->req, r, nr);
        handled++;
    }
}

/* Report, then serve the host for a while (spins polls). */
static void round_trip(uint64_t spins)
{
    report();
    for (uint64_t i = 0; i < spins; i++) {
        if (service())
            report();
        cpu_relax();
    }
}

static uint64_t verify(void)
{
    uint64_t pages = 0, bad = 0;
    for (uint32_t ni = 0; ni < nr_nodes; ni++)
        for (int k = 0; k < nodes[ni].nspans; k++) {
            struct span *s = &nodes[ni].spans[k];
            for (uint64_t i = 0; i < s->npages; i++)
                if (s->state[i] == P_USED) {
                    pages++;
                    if (sum_page(s->pfn + i) != s->csum[i]) {
                        if (bad++ < 4)
                            printf("numa-mem: page %#llx (node %u) checksum differs\n",
                                   (unsigned long long)(s->pfn + i), ni);
                    }
                }
        }
    if (bad) {
        printf("numa-mem: %llu of %llu pages corrupt\n", (unsigned long long)bad, (unsigned long long)pages);
        exit_code(4);
    }
    return pages;
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *cmd = bootinfo_cmdline(bi);
    uint64_t warm = arg_u64(cmd, "warm", 0) << 8, keep = arg_u64(cmd, "keep", 1) << 8;
    uint64_t grow = arg_u64(cmd, "grow", 48) << 8, step = arg_u64(cmd, "step", 2) << 8;
    uint32_t busy = (uint32_t)arg_u64(cmd, "busy", 1);
    uint64_t settle = arg_u64(cmd, "settle", 100);
    words = (uint32_t)arg_u64(cmd, "words", 8);
    if (words < 1 || words > 512 || 512 % words)
        words = 8;
    fast = (int)arg_u64(cmd, "fast", 0);
    if (fast)
        words = 1;

    if (bi->size < sizeof(*bi) || !bi->numa_info_addr) {
        printf("numa-mem: no NUMA block in the boot info (run with --numa-node)\n");
        exit_code(2);
    }
    const struct pykvm_numa_info *ni = (const void *)(uintptr_t)bi->numa_info_addr;
    if (ni->magic != PYKVM_NUMA_MAGIC || ni->nr_nodes == 0 || ni->nr_nodes > PYKVM_NUMA_MAX_NODES) {
        printf("numa-mem: bad NUMA block\n");
        exit_code(2);
    }
    nr_nodes = ni->nr_nodes;
    if (busy >= nr_nodes)
        busy = nr_nodes - 1;
    bump = (uint8_t *)(((uintptr_t)__image_end + PAGE - 1) & ~(PAGE - 1));
    /* size the tables first, so node 0's reserved part covers them */
    uint64_t meta = 0;
    for (uint32_t i = 0; i < nr_nodes; i++) {
        for (uint32_t k = 0; k < ni->nodes[i].nr_ranges && k < PYKVM_NUMA_MAX_RANGES; k++)
            meta += (ni->nodes[i].ranges[k].len / PAGE) * 5 + 16;
        meta += (ni->nodes[i].hotadd_len / PAGE) * 5 + 16 * MAX_SPANS;
    }
    uint64_t heap_pfn = ((uintptr_t)bump + meta + PAGE - 1) / PAGE;
    for (uint32_t i = 0; i < nr_nodes; i++) {
        const struct pykvm_numa_node *nn = &ni->nodes[i];
        nodes[i].hot_pfn = nn->hotadd_addr / PAGE;
        nodes[i].hot_pages = nn->hotadd_len / PAGE;
        for (uint32_t k = 0; k < nn->nr_ranges && k < PYKVM_NUMA_MAX_RANGES; k++)
            add_span(&nodes[i], nn->ranges[k].addr / PAGE, nn->ranges[k].len / PAGE, heap_pfn);
        printf("numa-mem: node %u: %llu MiB, cpus %u, hot-add reserve %llu MiB at %#llx, distance to 0: %u\n", i,
               (unsigned long long)(nodes[i].total >> 8), nn->nr_cpus, (unsigned long long)(nn->hotadd_len >> 20),
               (unsigned long long)nn->hotadd_addr, ni->distance[i][0]);
    }

    uint32_t busv[1] = { PYKVM_BUS_VERSION_1_0 };
    if (bus_connect(busv, 1) < 0 || !(ch = bus_find(PYKVM_BUS_IF_DYNMEM_LO, PYKVM_BUS_IF_DYNMEM_HI))) {
        printf("numa-mem: no dynamic memory service on the bus\n");
        exit_code(3);
    }
    uint32_t dmv[1] = { PYKVM_DYNMEM_V1_0 };
    if (bus_open(ch, dmv, 1)) {
        printf("numa-mem: cannot open the dynamic memory channel\n");
        exit_code(3);
    }
    printf("numa-mem: dynamic memory channel open\n");

    /* warm every node, then node 0 (and every idle node) frees all but `keep` */
    for (uint32_t i = 0; i < nr_nodes; i++) {
        uint64_t want = warm && warm < free_pages(&nodes[i]) ? warm : free_pages(&nodes[i]);
        if (fast && i != busy)
            touch_free(&nodes[i]);
        else
            alloc_pages(&nodes[i], want);
    }
    for (uint32_t i = 0; i < nr_nodes; i++)
        if (i != busy && !fast)
            free_all_but(&nodes[i], i == 0 ? keep : 0);
    if (fast && busy)
        alloc_pages(&nodes[0], keep);
    printf("numa-mem: warmed every node; node %u now grows to %llu MiB\n", busy, (unsigned long long)(grow >> 8));
    round_trip(200);

    struct node *b = &nodes[busy];
    while (b->used < grow) {
        uint64_t want = grow - b->used < step ? grow - b->used : step;
        uint64_t got = alloc_pages(b, want);
        b->unmet = want - got;
        uint64_t waited = 0;
        round_trip(100);
        while (b->unmet) {             /* short: wait for the host to grow the node */
            uint64_t more = alloc_pages(b, b->unmet);
            b->unmet -= more;
            if (!b->unmet)
                break;
            round_trip(2000);
            if (++waited > 20000) {
                printf("numa-mem: node %u stuck at %llu pages; the host never grew it\n", busy,
                       (unsigned long long)b->used);
                exit_code(5);
            }
        }
    }
    /* idle: let the balancer finish with the idle nodes */
    for (uint64_t r = 0; r < settle; r++)
        round_trip(200);

    for (uint32_t i = 0; i < nr_nodes; i++)
        printf("numa-mem: node %u: total %llu pages, used %llu, reserved %llu, free %llu, ballooned %llu pages, "
               "hot-added %llu pages\n", i, (unsigned long long)nodes[i].total, (unsigned long long)nodes[i].used,
               (unsigned long long)nodes[i].reserved, (unsigned long long)free_pages(&nodes[i]),
               (unsigned long long)nodes[i].ballooned, (unsigned long long)nodes[i].hotadded);
    printf("numa-mem: host messages: %llu balloon, %llu unballoon, %llu hot-add\n", (unsigned long long)balloon_reqs,
           (unsigned long long)unballoon_msgs, (unsigned long long)hotadd_msgs);
    uint64_t park = arg_u64(cmd, "park", 0);
    bus_close(ch);
    bus_unload();
    if (park) {
        printf("numa-mem: parked\n");
        for (volatile uint64_t i = 0; i < park * 1000; i++)
            ;
    }
    uint64_t pages = verify();
    printf("numa-mem: checksums ok: %llu pages\n", (unsigned long long)pages);
    poweroff();
}
