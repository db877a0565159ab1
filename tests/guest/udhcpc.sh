#!/bin/sh
# udhcpc event script: apply the lease and print it on one line for the tests.
case "$1" in
  deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
  bound|renew)
    ip addr flush dev "$interface" scope global
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip route add default via "$r" dev "$interface"; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    echo "VG-LEASE ip=$ip mask=$mask router=$router dns=$dns mtu=$mtu lease=$lease search=$search serverid=$serverid"
    ;;
esac
exit 0
