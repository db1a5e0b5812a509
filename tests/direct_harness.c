/* Host-built harness for tests/test_direct.py: runs the guest runtime's parsers
 * (guests/runtime/direct_check.c) on records read from stdin and prints one
 * result per line. A record is one kind byte, then
 *   kind 0: u32 length, then sizeof(struct pykvm_direct_msg) bytes
 *           -> direct_msg_check()
 *   kind 1: u32 length, u32 data_bytes, u32 max_transfer, u32 rules, u64 sectors,
 *           then 40 payload bytes -> direct_blk_check(): "status op sector count offset length"
 */
#include <stdio.h>
#include <string.h>
#include "direct.h"

int main(void)
{
    int kind;
    while ((kind = getchar()) != EOF) {
        if (kind == 0) {
            unsigned char rec[4 + sizeof(struct pykvm_direct_msg)];
            uint32_t len;
            struct pykvm_direct_msg m;
            if (fread(rec, sizeof(rec), 1, stdin) != 1)
                return 1;
            memcpy(&len, rec, 4);
            memcpy(&m, rec + 4, sizeof(m));
            printf("%d\n", direct_msg_check(&m, len));
        } else if (kind == 1) {
            unsigned char rec[24 + 40];
            uint32_t len, data_bytes, max_transfer, rules;
            uint64_t sectors;
            struct direct_blk b;
            if (fread(rec, sizeof(rec), 1, stdin) != 1)
                return 1;
            memcpy(&len, rec, 4);
            memcpy(&data_bytes, rec + 4, 4);
            memcpy(&max_transfer, rec + 8, 4);
            memcpy(&rules, rec + 12, 4);
            memcpy(&sectors, rec + 16, 8);
            int st = direct_blk_check(rec + 24, len, data_bytes, max_transfer, rules, sectors, &b);
            if (st == PYKVM_BUS_OK)
                printf("%d %u %llu %u %u %u\n", st, b.op, (unsigned long long)b.sector, b.count, b.offset, b.length);
            else
                printf("%d\n", st);
        } else {
            return 1;
        }
    }
    return 0;
}
