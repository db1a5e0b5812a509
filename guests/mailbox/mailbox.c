/*
 * mailbox: drives the supervised mailbox device (PYKVM_PORT_MAILBOX) like a careful
 * driver, and the power-control block (PYKVM_PORT_POWERCTL).
 *
 * --cmdline "power": power the mailbox down and up through the power-control block.
 * Expected output, exact bytes:
 *     "mailbox: power test\n"
 *     "d3 state=3 data=0xffffffff\n"
 *     "d0 state=0 data=0x1234\n"
 *     "mailbox: power ok\n"
 * then exit code 0x12 (status 37).
 *
 * --cmdline "work" (or "work rounds=N"): write every slot and read it back, round after
 * round, until the host sets PYKVM_MAILBOX_FLAG_STOP (or N rounds are done). A read of all
 * ones means the device is not serving (failed, being replaced, powered down): the driver
 * asks the power-control block and retries, or stops if the device is gone. A replacement
 * is restored from the last good state the VMM saw, which may predate recent writes, so
 * like a driver after a reset the guest re-programs a round when STATUS shows a new
 * generation. Output:
 *     "mailbox: work\n"
 *     "mailbox: work done, data verified\n"           exit code 0x10 (status 33)
 * or, when the device was surprise-removed:
 *     "mailbox: device removed\n"                     exit code 0x11 (status 35)
 * A verification failure prints "FAIL ..." and exits with 0x30 (status 97).
 *
 * Any other command line (none at all included) would leave "work" waiting for a host
 * that may never say stop, so the guest says what it needs instead:
 *     "mailbox: needs --cmdline power, work or \"work rounds=N\" (got \"<cmdline>\")\n"
 * and exits with 0x31 (status 99).
 */
#include "rt.h"

#define MB PYKVM_PORT_MAILBOX
#define PC PYKVM_PORT_POWERCTL
#define ALL_ONES 0xffffffffu

static uint32_t pattern(uint32_t round, uint32_t slot)
{
    return (round * 0x9e3779b1u) ^ (slot * 0x85ebca77u) ^ 0x5a5a0000u;
}

static uint32_t power_state(void)
{
    outl(PC + PYKVM_POWERCTL_SELECT, MB);
    return inl(PC + PYKVM_POWERCTL_STATE);
}

/* Wait until the mailbox serves again; returns 0, or -1 when it is gone for good. */
static int wait_for_device(void)
{
    for (;;) {
        if ((inl(MB + PYKVM_MAILBOX_STATUS) >> 16) == PYKVM_MAILBOX_MAGIC)
            return 0;
        if (power_state() == PYKVM_POWER_ABSENT)
            return -1;
        __asm__ volatile("pause");
    }
}

/* Store v in slot i and make sure it is there; -1 if the device disappeared. */
static int store(uint32_t i, uint32_t v)
{
    for (;;) {
        outl(MB + PYKVM_MAILBOX_INDEX, i);
        outl(MB + PYKVM_MAILBOX_DATA, v);
        uint32_t idx = inl(MB + PYKVM_MAILBOX_INDEX);
        uint32_t got = inl(MB + PYKVM_MAILBOX_DATA);
        if (idx == i && got == v)
            return 0;
        if ((idx == ALL_ONES || got == ALL_ONES) && wait_for_device() < 0)
            return -1;
    }
}

/* Read slot i; -1 in *ok when the device disappeared. */
static uint32_t load(uint32_t i, int *ok)
{
    for (;;) {
        outl(MB + PYKVM_MAILBOX_INDEX, i);
        uint32_t idx = inl(MB + PYKVM_MAILBOX_INDEX);
        uint32_t got = inl(MB + PYKVM_MAILBOX_DATA);
        if (idx == i && got != ALL_ONES && inl(MB + PYKVM_MAILBOX_INDEX) == i) {
            *ok = 0;
            return got;
        }
        if (wait_for_device() < 0) {
            *ok = -1;
            return 0;
        }
    }
}

/* The instance generation; a change means the device was re-enumerated and restored from
 * an older state, so what was written since may be gone. -1 when the device is gone. */
static int32_t generation(void)
{
    for (;;) {
        uint32_t st = inl(MB + PYKVM_MAILBOX_STATUS);
        if ((st >> 16) == PYKVM_MAILBOX_MAGIC)
            return (int32_t)(st & 0xffff);
        if (wait_for_device() < 0)
            return -1;
    }
}

/* Write one round's pattern into every slot, redoing it if the device was replaced meanwhile. */
static int write_round(uint32_t round)
{
    for (;;) {
        int32_t gen = generation();
        if (gen < 0)
            return -1;
        for (uint32_t i = 0; i < PYKVM_MAILBOX_SLOTS; i++)
            if (store(i, pattern(round, i)) < 0)
                return -1;
        int32_t after = generation();
        if (after < 0)
            return -1;
        if (after == gen)
            return 0;
    }
}

static void work(const char *cmdline)
{
    uint32_t rounds = 0, max_rounds = 0;
    const char *r = cmdline;
    while (*r && strncmp(r, "rounds=", 7) != 0)
        r++;
    if (*r)
        for (r += 7; *r >= '0' && *r <= '9'; r++)
            max_rounds = max_rounds * 10 + (uint32_t)(*r - '0');

    printf("mailbox: work\n");
    for (;;) {
        if (write_round(rounds) < 0)
            goto removed;
        rounds++;
        uint32_t flags = inl(MB + PYKVM_MAILBOX_HOST_FLAGS);
        if (max_rounds ? rounds >= max_rounds : flags != ALL_ONES && (flags & PYKVM_MAILBOX_FLAG_STOP))
            break;
    }
    /* verify; a replacement during verification means re-program and verify again */
    for (;;) {
        int32_t gen = generation();
        if (gen < 0)
            goto removed;
        for (uint32_t i = 0; i < PYKVM_MAILBOX_SLOTS; i++) {
            int ok;
            uint32_t got = load(i, &ok);
            if (ok < 0)
                goto removed;
            if (got != pattern(rounds - 1, i) && generation() == gen) {
                printf("FAIL slot %u: %#x, expected %#x\n", i, got, pattern(rounds - 1, i));
                exit_code(0x30);
            }
        }
        int32_t after = generation();
        if (after < 0)
            goto removed;
        if (after == gen)
            break;
        if (write_round(rounds - 1) < 0)
            goto removed;
    }
    printf("mailbox: work done, data verified\n");
    exit_code(0x10);
removed:
    printf("mailbox: device removed\n");
    exit_code(0x11);
}

static void power(void)
{
    printf("mailbox: power test\n");
    outl(MB + PYKVM_MAILBOX_INDEX, 5);
    outl(MB + PYKVM_MAILBOX_DATA, 0x1234);

    outl(PC + PYKVM_POWERCTL_SELECT, MB);
    outl(PC + PYKVM_POWERCTL_STATE, PYKVM_POWER_D3);
    uint32_t st = inl(PC + PYKVM_POWERCTL_STATE);
    uint32_t data = inl(MB + PYKVM_MAILBOX_DATA);
    outl(MB + PYKVM_MAILBOX_DATA, 0x9999);     /* dropped: the device is not in D0 */
    printf("d3 state=%u data=%#x\n", st, data);

    outl(PC + PYKVM_POWERCTL_STATE, PYKVM_POWER_D0);
    st = inl(PC + PYKVM_POWERCTL_STATE);
    outl(MB + PYKVM_MAILBOX_INDEX, 5);
    data = inl(MB + PYKVM_MAILBOX_DATA);
    printf("d0 state=%u data=%#x\n", st, data);
    if (st != PYKVM_POWER_D0 || data != 0x1234) {
        printf("FAIL power\n");
        exit_code(0x30);
    }
    printf("mailbox: power ok\n");
    exit_code(0x12);
}

void kmain(struct pykvm_boot_info *bi)
{
    const char *err = bootinfo_validate(bi);
    if (err)
        panic("bad boot info: %s", err);
    const char *cmd = bootinfo_cmdline(bi);
    if (strcmp(cmd, "power") == 0)
        power();
    if (strcmp(cmd, "work") == 0 || strncmp(cmd, "work ", 5) == 0)
        work(cmd);
    printf("mailbox: needs --cmdline power, work or \"work rounds=N\" (got \"%s\")\n", cmd);
    exit_code(0x31);
}
