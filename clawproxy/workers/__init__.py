"""
Worker processes (C{server.workers: N}): one parent, N children sharing the
listening sockets.

The parent binds every data-plane listener once and hands the sockets to
the children it spawns (L{supervisor}); each child adopts them and serves
the data plane (L{child}). The parent alone runs the admin listener, the
health prober and the simulators, serves its memory store to the children
(L{clawproxy.stores.amp}), and tells them what the prober and the admin API
decide, over one AMP channel per child (L{commands}).
"""
