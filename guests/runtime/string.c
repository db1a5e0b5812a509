/* Minimal string functions (gcc may emit calls to memset/memcpy/memmove). */
#include "rt.h"

/* Eight bytes per iteration, then the tail: an emulating KVM (or a TCG) pays per iteration of
 * a rep string instruction, where hardware with fast strings pays about the same either way. */
void *memset(void *d, int c, size_t n)
{
    void *ret = d;
#ifdef __x86_64__
    size_t q = n >> 3, tail = n & 7;
    uint64_t v = 0x0101010101010101ull * (uint8_t)c;
    __asm__ volatile("cld; rep stosq; mov %3, %%rcx; rep stosb"
                     : "+D"(d), "+c"(q), "+a"(v) : "r"(tail) : "memory");
#else
    __asm__ volatile("cld; rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
#endif
    return ret;
}

void *memcpy(void *d, const void *s, size_t n)
{
    void *ret = d;
#ifdef __x86_64__
    size_t q = n >> 3, tail = n & 7;
    __asm__ volatile("cld; rep movsq; mov %3, %%rcx; rep movsb"
                     : "+D"(d), "+S"(s), "+c"(q) : "r"(tail) : "memory");
#else
    __asm__ volatile("cld; rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
#endif
    return ret;
}

void *memmove(void *d, const void *s, size_t n)
{
    unsigned char *dp = d;
    const unsigned char *sp = s;
    if (dp <= sp || dp >= sp + n)
        return memcpy(d, s, n);
    while (n--)
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            break;
    }
    return 0;
}
