# Multicast reception of the board RMA (board_rx.Content; B.17 multicast-enabled groups, the
# rmcp2.json "content" "mcast" of docs/rmcp2.md "Multicast reception", defined by this
# project): the group's socket joined after each join to the DMA and left when the control
# link ends. A module of its own, imported only by a board whose rmcp2.json names a group, so
# that boards without one do not hold its code while their control link runs.
import socket

from tessera_fw.rmcp2.content import mcast_join


def join(mcast, log):
    """A non-blocking UDP socket on the group's port (`mcast`: group 4 bytes, port,
    interface 4 bytes), joined to the group on the interface; None, said by `log`, when it
    cannot be (that control link runs without it)."""
    group, port, iface = mcast
    so = None
    try:
        so = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        so.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        so.bind(socket.getaddrinfo("0.0.0.0", port)[0][-1])
        mcast_join(so, group, iface)
        so.settimeout(0)
        return so
    except OSError as e:
        if so is not None:
            so.close()
        log("rmcp2: no multicast group (%s)" % type(e).__name__)
        return None


def leave(so, mcast):
    """Leave the group (IP_DROP_MEMBERSHIP; IPPROTO_IP is 0, as content.mcast_join) and close
    the socket. Closing alone leaves it with Linux and the lwIP socket API; the explicit drop
    is for ports whose sockets keep IGMP state past close (not every lwIP binding tracks it)."""
    g, _port, iface = mcast
    try:
        so.setsockopt(0, socket.IP_DROP_MEMBERSHIP, bytes(g) + bytes(iface))
    except (OSError, AttributeError):  # not joined, or no IP_DROP_MEMBERSHIP on this port
        pass
    so.close()
