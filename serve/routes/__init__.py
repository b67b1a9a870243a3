"""The HTTP routes, one module per endpoint group; each module's `router` is included by the app.

What they share lives outside this package: the loaded service and its dependencies in
`serve.service`, bounded body reading in `serve.body`, image decoding in `serve.images`, request
costs in `serve.cost`. Route modules do not import each other.
"""
