/* Host-built harness for tests/test_direct.py: runs the guest runtime's
 * direct_msg_check() (guests/runtime/direct_check.c) on records read from
 * stdin (u32 length, then 40 bytes) and prints one result per line. */
#include <stdio.h>
#include <string.h>
#include "direct.h"

int main(void)
{
    unsigned char rec[4 + sizeof(struct pykvm_direct_msg)];
    while (fread(rec, sizeof(rec), 1, stdin) == 1) {
        uint32_t len;
        struct pykvm_direct_msg m;
        memcpy(&len, rec, 4);
        memcpy(&m, rec + 4, sizeof(m));
        printf("%d\n", direct_msg_check(&m, len));
    }
    return 0;
}
