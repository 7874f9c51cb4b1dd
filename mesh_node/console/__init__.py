"""Status console: the management HTTP API, the live status page and its event stream.

The console reads mesh state from a `StatusSource` (`mesh_node.console.source`,
implemented by membership); it never owns state. `ConsoleServer(source, host, port)`
(`mesh_node.console.server`, default port 3131) serves it. The HTTP API and the JSON
document are specified in proto/CONSOLE.md.

Modules: `source` (the interface consumed), `api` (routes, JSON errors, page files),
`events` (the SSE stream), `server` (lifetime), `page/` (the status page), `client` and
`report` (fetching and printing the document for `mesh-node status`). This package
`__init__` imports nothing, so `mesh-node` commands do not pay for aiohttp.
"""
