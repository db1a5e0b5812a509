#!/bin/sh
# Fail if any executable section of the given ELF files contains an
# instruction this (nested, software-assisted) KVM cannot run: int3 (and
# `int $3`), movbe, xrstor*, cmpxchg16b.
#
# Each executable section is disassembled in the CPU mode its name ends with
# (".tramp16" -> 16-bit, ".stubs32" -> 32-bit, ".stubs64" -> 64-bit), else in
# the mode of the ELF class.
#
# usage: check-insns.sh file.elf...      (OBJDUMP/READELF may be overridden)
set -eu
OBJDUMP=${OBJDUMP:-objdump}
READELF=${READELF:-readelf}
bad='[[:space:]](int3|movbe[a-z]*|xrstor[a-z0-9]*|cmpxchg16b)([[:space:]]|$)|[[:space:]]int[[:space:]]+\$0x3([^0-9a-fx]|$)'
status=0
for f in "$@"; do
    case $($READELF -h "$f" | awk '/Class:/ {print $2}') in
        ELF32) default=i386 ;;
        *) default=x86-64 ;;
    esac
    secs=$($READELF -S -W "$f" | sed -n 's/^ *\[ *[0-9]*\] //p' | awk '$7 ~ /X/ {print $1}')
    for s in $secs; do
        case $s in
            *16) mode=i8086 ;;
            *32) mode=i386 ;;
            *64) mode=x86-64 ;;
            *) mode=$default ;;
        esac
        hits=$($OBJDUMP -d -M "$mode" -j "$s" "$f" | grep -E "$bad" || true)
        if [ -n "$hits" ]; then
            echo "check-insns: $f ($s, $mode): forbidden instruction(s):" >&2
            echo "$hits" >&2
            status=1
        fi
    done
done
exit $status
