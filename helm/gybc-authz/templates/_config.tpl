{{/*
Where the config file is mounted: in the gybc-authz container, or in module mode in the Envoy
container, whose module filter is given this path. One path for both, so the module reads
exactly the file the daemon would.
*/}}
{{- define "gybc-authz.configPath" -}}
/etc/gybc-authz/config.yaml
{{- end }}

{{/*
Where the key file is mounted (the gybc-authz container, or Envoy's in module mode).
*/}}
{{- define "gybc-authz.keyFileDir" -}}
/etc/gybc-authz/keys
{{- end }}

{{/*
Module mode: the module's name in Envoy's config. Envoy loads lib<name>.so from
$ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
*/}}
{{- define "gybc-authz.moduleName" -}}
gybc_authz_envoy
{{- end }}

{{/*
Module mode: the directory holding the module, in the gybc-authz image (where
deploy/docker/Dockerfile installs it) and, on an emptyDir, in the Envoy container: one path,
so what the pod runs can be found in the image at the same place.
*/}}
{{- define "gybc-authz.moduleDir" -}}
/usr/local/lib/gybc-authz
{{- end }}

{{/*
The engine's environment: the Redis credentials from the Secret and gybcAuthz.extraEnv. Given
to the gybc-authz container, or in module mode to Envoy's, where the engine runs. Returns YAML
(a list, possibly empty).
*/}}
{{- define "gybc-authz.engineEnv" -}}
{{- $a := .Values.gybcAuthz }}
{{- if $a.redis.existingSecret }}
{{- if $a.redis.passwordKey }}
- name: GYBC_AUTHZ_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: { name: {{ $a.redis.existingSecret | quote }}, key: {{ $a.redis.passwordKey | quote }} }
{{- end }}
{{- if $a.redis.sentinel.passwordKey }}
- name: GYBC_AUTHZ_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef: { name: {{ $a.redis.existingSecret | quote }}, key: {{ $a.redis.sentinel.passwordKey | quote }} }
{{- end }}
{{- if $a.redis.urlKey }}
# The Redis URL(s) from the Secret, then the config override the engine reads:
# Kubernetes expands $(GYBC_AUTHZ_REDIS_URL), defined just above, into a YAML
# flow list, so the item holds one URL or several separated by commas.
- name: GYBC_AUTHZ_REDIS_URL
  valueFrom:
    secretKeyRef: { name: {{ $a.redis.existingSecret | quote }}, key: {{ $a.redis.urlKey | quote }} }
- name: GYBC_AUTHZ__REDIS__URLS
  value: "[$(GYBC_AUTHZ_REDIS_URL)]"
{{- end }}
{{- end }}
{{- with $a.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
gybc-authz's config.yaml: gybcAuthz.config, plus the parts the chart owns (`server`, the
key file's `key_store`, Redis URLs or sentinels and password variables, and with keyService.enabled
the key service's addresses, prefix and scopes in `key_service`). Redis URLs kept in a Secret
(gybcAuthz.redis.urlKey) are not in this file: the daemon reads them from the environment.
*/}}
{{- define "gybc-authz.config" -}}
{{- $a := .Values.gybcAuthz }}
{{- $c := deepCopy ($a.config | default dict) }}
{{- $_ := set $c "server" (dict
  "grpc_addr" (printf "127.0.0.1:%d" (int $a.ports.grpc))
  "http_addr" (printf "0.0.0.0:%d" (int $a.ports.http))
  "shutdown_grace_secs" (int $a.shutdownGraceSeconds)) }}
{{- if or $a.keyFile.existingSecret $a.keyFile.existingConfigMap }}
{{- $_ := set $c "key_store" (dict
  "type" "file"
  "path" (printf "%s/%s" (include "gybc-authz.keyFileDir" .) $a.keyFile.key)
  "reload_interval_ms" (int $a.keyFile.reloadIntervalMs)) }}
{{- end }}
{{- $sentinel := $a.redis.sentinel }}
{{- if or $a.redis.urls (and $a.redis.existingSecret $a.redis.urlKey) $sentinel.masterName }}
{{- $r := deepCopy ($c.redis | default dict) }}
{{- if $a.redis.urls }}
{{- $_ := set $r "urls" $a.redis.urls }}
{{- end }}
{{- if $sentinel.masterName }}
{{- /* Over whatever gybcAuthz.config.redis.sentinel holds (a tls_ca_file, say). */}}
{{- $s := deepCopy ($r.sentinel | default dict) }}
{{- $_ := set $s "master_name" $sentinel.masterName }}
{{- $_ := set $s "urls" $sentinel.urls }}
{{- if $sentinel.username }}{{ $_ := set $s "username" $sentinel.username }}{{ end }}
{{- if $sentinel.passwordKey }}{{ $_ := set $s "password_env" "GYBC_AUTHZ_REDIS_SENTINEL_PASSWORD" }}{{ end }}
{{- if $sentinel.dataNodesTls }}{{ $_ := set $s "data_nodes_tls" true }}{{ end }}
{{- $_ := set $r "sentinel" $s }}
{{- end }}
{{- /* With urlKey, the URLs come from the Secret as GYBC_AUTHZ__REDIS__URLS (deployment.yaml). */}}
{{- if $a.redis.cluster }}{{ $_ := set $r "cluster" true }}{{ end }}
{{- if $a.redis.username }}{{ $_ := set $r "username" $a.redis.username }}{{ end }}
{{- if and $a.redis.existingSecret $a.redis.passwordKey }}
{{- $_ := set $r "password_env" "GYBC_AUTHZ_REDIS_PASSWORD" }}
{{- end }}
{{- $_ := set $c "redis" $r }}
{{- end }}
{{- if .Values.keyService.enabled }}
{{- /* The key service's section: the chart owns its addresses, prefix and scopes. */}}
{{- $k := .Values.keyService }}
{{- $ks := deepCopy ($c.key_service | default dict) }}
{{- $_ := set $ks "listen_addr" (printf "127.0.0.1:%d" (int $k.port)) }}
{{- $_ := set $ks "admin_addr" (printf "0.0.0.0:%d" (int $k.adminPort)) }}
{{- $_ := set $ks "path_prefix" $k.pathPrefix }}
{{- $_ := set $ks "allowed_scopes" $k.allowedScopes }}
{{- $_ := set $c "key_service" $ks }}
{{- end -}}
# gybc-authz configuration, rendered by the Helm chart from gybcAuthz.* values.
# Reference: docs/configuration.md; check with `gybc-authz check-config FILE`.
{{ toYaml $c }}
{{- end }}
