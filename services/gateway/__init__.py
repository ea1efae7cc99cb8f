"""The HTTP/JSON gateway: REST routes transcoded to the gRPC services, OpenAPI, and the web console.

`python -m services.gateway` serves it (`tuneforge up` starts it beside the services); `app.create_app`
builds the aiohttp application; `rules` reads the routes from the protos' `google.api.http` annotations;
`transcode` turns HTTP requests into messages and messages into JSON; `errors` maps gRPC statuses to HTTP;
`openapi` writes gen/openapi/ from the same annotations and the protos' comments.
"""
