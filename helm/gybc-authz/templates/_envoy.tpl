{{/*
Envoy's bootstrap: the same config as deploy/envoy/envoy.yaml (sidecar mode) or
deploy/envoy/envoy-module.yaml (module mode), documented line by line there, with ports,
timeouts, health paths, per-route settings and the upstream from values. The chart tests
render it with the shipped files' values and require them to be identical, and run
`envoy --mode validate` on every rendering (module mode with the built module).
*/}}
{{- define "gybc-authz.envoyConfig" -}}
{{- include "gybc-authz.envoyBootstrap" (dict "root" . "keyService" false) }}
{{- end }}

{{/*
The key service's Envoy (keyService.enabled): deploy/envoy/key-service.yaml. The same
listeners, filters, gybc-authz (ext_authz or the module, as `mode` says) and admin as the
main workload's; only the routes and the upstream differ: the key API's prefix goes to the key
service on 127.0.0.1:<keyService.port>, anything else gets 404. The chart tests require the
shipped file from the shipped values, as for the others.
*/}}
{{- define "gybc-authz.keyServiceEnvoyConfig" -}}
{{- include "gybc-authz.envoyBootstrap" (dict "root" . "keyService" true) }}
{{- end }}

{{/*
Both bootstraps. Call with (dict "root" $ "keyService" <bool>).
*/}}
{{- define "gybc-authz.envoyBootstrap" -}}
{{- $root := .root }}
{{- $ks := .keyService }}
{{- $v := $root.Values }}
{{- $e := $v.envoy }}
{{- $module := eq $v.mode "module" }}
{{- $strip := concat (include "gybc-authz.identityHeaders" $root | fromYamlArray) (list "x-api-key" "x-on-behalf-of") -}}
{{- if $ks -}}
# Envoy in front of the key service (gybc-authz key-service), rendered by the gybc-authz Helm
# chart{{ if $module }} with gybc-authz as a dynamic module{{ end }}; the annotated original is
# deploy/envoy/key-service.yaml in the gybc-authz repository.
{{- else if $module -}}
# Envoy config with gybc-authz as a dynamic module, rendered by the gybc-authz Helm chart;
# the annotated original is deploy/envoy/envoy-module.yaml in the gybc-authz repository.
{{- else -}}
# Envoy sidecar config rendered by the gybc-authz Helm chart; the annotated original is
# deploy/envoy/envoy.yaml in the gybc-authz repository.
{{- end }}
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: {{ int $e.ports.admin }} }
overload_manager:
  resource_monitors:
    - name: envoy.resource_monitors.global_downstream_max_connections
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig
        max_active_downstream_connections: {{ int $e.maxConnections }}
static_resources:
  listeners:
    - name: ingress
      address:
        socket_address: { address: 0.0.0.0, port_value: {{ int $e.ports.http }} }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: ingress
                codec_type: AUTO
                # gybc-authz judges the path the upstream receives.
                normalize_path: true
                merge_slashes: true
                path_with_escaped_slashes_action: KEEP_UNCHANGED
                route_config:
                  {{- if $ks }}
                  name: key_service
                  virtual_hosts:
                    - name: key_service
                      domains: ["*"]
                      {{- if $e.cors.enabled }}
                      # Browsers: Envoy's CORS filter answers preflights before gybc-authz and
                      # makes every answer readable by the page (docs/browsers.md).
                      typed_per_filter_config:
                        envoy.filters.http.cors:
                          {{- include "gybc-authz.corsPolicy" $root | nindent 26 }}
                      {{- end }}
                      routes:
                        # The key API, every request checked by gybc-authz (the filter below).
                        - match: { prefix: {{ printf "%s/" $v.keyService.pathPrefix | quote }} }
                          route: { cluster: key_service, timeout: {{ $v.keyService.routeTimeout }} }
                        # Nothing else is served here: 404 as the key API's JSON error.
                        - match: { prefix: / }
                          direct_response:
                            status: 404
                            body: { inline_string: '{"code":"not_found","reason":"unknown_method","message":"No such method."}' }
                          response_headers_to_add:
                            - header: { key: content-type, value: application/json }
                              append_action: OVERWRITE_IF_EXISTS_OR_ADD
                # Envoy's own answers about the key service as the key API's JSON errors.
                local_reply_config:
                  mappers:
                    - filter: { response_flag_filter: { flags: [UT] } }
                      body_format_override:
                        json_format: { code: deadline_exceeded, reason: upstream_timeout, message: "The key service did not answer in time." }
                    - filter: { response_flag_filter: { flags: [UH, UF, UC, URX, UO] } }
                      body_format_override:
                        json_format: { code: unavailable, reason: key_service_unavailable, message: "The key service is unavailable; retry shortly." }
                  {{- else }}
                  name: local_app
                  virtual_hosts:
                    - name: app
                      domains: ["*"]
                      {{- if $e.cors.enabled }}
                      # Browsers: Envoy's CORS filter answers preflights before gybc-authz and
                      # makes every answer readable by the page (docs/browsers.md).
                      typed_per_filter_config:
                        envoy.filters.http.cors:
                          {{- include "gybc-authz.corsPolicy" $root | nindent 26 }}
                      {{- end }}
                      routes:
                        {{- range $e.healthPaths }}
                        # Health endpoint: no check for GET/HEAD; Envoy strips identity and credentials.
                        - match:
                            path: {{ . | quote }}
                            headers:
                              - name: ":method"
                                string_match: { safe_regex: { regex: "GET|HEAD" } }
                          route: { cluster: app, timeout: 5s }
                          request_headers_to_remove:
                            {{- range $strip }}
                            - {{ . }}
                            {{- end }}
                          typed_per_filter_config:
                            {{- if $module }}
                            # Envoy's generic per-route switch (the module filter has no `disabled`).
                            gybc_authz:
                              "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig
                              disabled: true
                            {{- else }}
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              disabled: true
                            {{- end }}
                        {{- end }}
                        {{- range $e.routes }}
                        # Per-route settings (envoy.routes): read by gybc-authz on this route only.
                        - match:
                            {{- toYaml .match | nindent 28 }}
                          route: { cluster: app, timeout: {{ $e.routeTimeout }} }
                          typed_per_filter_config:
                            {{- if $module }}
                            gybc_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilterPerRoute
                              dynamic_module_config: { name: {{ include "gybc-authz.moduleName" $root }} }
                              filter_name: gybc_authz
                              # The module takes the keys as a JSON object of strings.
                              filter_config:
                                "@type": type.googleapis.com/google.protobuf.StringValue
                                value: {{ toJson .settings | quote }}
                            {{- else }}
                            envoy.filters.http.ext_authz:
                              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                              check_settings:
                                context_extensions:
                                  {{- range $key, $value := .settings }}
                                  {{ $key }}: {{ $value | quote }}
                                  {{- end }}
                            {{- end }}
                        {{- end }}
                        - match: { prefix: / }
                          route: { cluster: app, timeout: {{ $e.routeTimeout }} }
                  {{- end }}
                http_filters:
                  {{- if $e.cors.enabled }}
                  # Before gybc-authz: preflights never reach it, and its denials get the CORS headers.
                  - name: envoy.filters.http.cors
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
                  {{- end }}
                  {{- if $module }}
                  - name: gybc_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
                      # do_not_close: the engine's own threads must never see the library unloaded.
                      dynamic_module_config: { name: {{ include "gybc-authz.moduleName" $root }}, do_not_close: true, metrics_namespace: gybc }
                      filter_name: gybc_authz
                      # The config file's path (mounted into this container): the file the
                      # daemon would read, so both modes run one config.
                      filter_config:
                        "@type": type.googleapis.com/google.protobuf.StringValue
                        value: {{ include "gybc-authz.configPath" $root }}
                  {{- else }}
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service:
                        envoy_grpc: { cluster_name: gybc_authz }
                        timeout: {{ $e.authzTimeout }}
                      # Fail closed, and answer 503 (not 403) when gybc-authz cannot answer.
                      failure_mode_allow: false
                      status_on_error: { code: ServiceUnavailable }
                      # Only the headers gybc-authz reads.
                      allowed_headers:
                        patterns:
                          - { exact: authorization, ignore_case: true }
                          - { exact: x-api-key, ignore_case: true }
                          - { exact: x-on-behalf-of, ignore_case: true }
                          - { exact: origin, ignore_case: true }
                          - { exact: x-request-id, ignore_case: true }
                      validate_mutations: true
                  {{- end }}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - name: stats
      address:
        socket_address: { address: 0.0.0.0, port_value: {{ int $e.ports.stats }} }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: stats
                codec_type: AUTO
                route_config:
                  name: stats
                  virtual_hosts:
                    - name: stats
                      domains: ["*"]
                      routes:
                        - match: { path: /ready }
                          route: { cluster: envoy_admin }
                        - match: { path: /stats/prometheus }
                          route: { cluster: envoy_admin }
                        - match: { prefix: / }
                          direct_response: { status: 404 }
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    {{- if not $module }}
    - name: gybc_authz
      type: STATIC
      connect_timeout: 0.25s
      load_assignment:
        cluster_name: gybc_authz
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: { address: 127.0.0.1, port_value: {{ int $v.gybcAuthz.ports.grpc }} }
      # gRPC needs HTTP/2; without it every Check fails at run time.
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
    {{- end }}
    {{- if $ks }}
    # The key service, in the same pod, on loopback only.
    - name: key_service
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: key_service
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: { address: 127.0.0.1, port_value: {{ int $v.keyService.port }} }
    {{- else }}
    - name: app
      {{- if $v.app.enabled }}
      type: STATIC
      {{- else }}
      # A DNS name (a Service): re-resolved as it changes.
      type: STRICT_DNS
      {{- end }}
      connect_timeout: 1s
      load_assignment:
        cluster_name: app
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    {{- if $v.app.enabled }}
                    socket_address: { address: 127.0.0.1, port_value: {{ int $v.app.port }} }
                    {{- else }}
                    socket_address: { address: {{ $e.upstream.address | quote }}, port_value: {{ int $e.upstream.port }} }
                    {{- end }}
    {{- end }}
    - name: envoy_admin
      type: STATIC
      connect_timeout: 0.25s
      load_assignment:
        cluster_name: envoy_admin
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: { address: 127.0.0.1, port_value: {{ int $e.ports.admin }} }
{{- end }}


{{/*
Envoy's CORS policy (envoy.extensions.filters.http.cors.v3.CorsPolicy) for the ingress virtual
host, from envoy.cors and the daemon's config: the header lists are the ones
crates/engine/src/browser.rs names (`gybc-authz cors-policy` prints them for a config file,
and the chart tests compare every rendering with it). The exposed headers follow
gybcAuthz.config.rate_limit.ietf_headers.
*/}}
{{- define "gybc-authz.corsPolicy" -}}
{{- $c := .Values.envoy.cors }}
{{- $ietf := dig "rate_limit" "ietf_headers" false (.Values.gybcAuthz.config | default dict) }}
{{- $expose := list "x-ratelimit-limit" "x-ratelimit-remaining" "x-ratelimit-reset" "retry-after" }}
{{- if $ietf }}
{{- $expose = concat $expose (list "ratelimit" "ratelimit-policy") }}
{{- end }}
{{- $expose = concat $expose (list "www-authenticate" "idempotent-replayed") }}
"@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
# Origins a preflight is answered for; the key's allowlist decides who may call.
allow_origin_string_match:
  {{- toYaml $c.allowOrigins | nindent 2 }}
allow_methods: "GET, POST, PUT, PATCH, DELETE"
allow_headers: "x-api-key, authorization, x-on-behalf-of, content-type, idempotency-key, traceparent, tracestate"
expose_headers: {{ join ", " $expose | quote }}
max_age: {{ $c.maxAgeSeconds | int | toString | quote }}
# A non-matching preflight is answered by Envoy too, without CORS headers.
forward_not_matching_preflights: false
{{- end }}
