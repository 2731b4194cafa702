{{/*
Where the key file is mounted in the gybc-authz container.
*/}}
{{- define "gybc-authz.keyFileDir" -}}
/etc/gybc-authz/keys
{{- end }}

{{/*
gybc-authz's config.yaml: gybcAuthz.config, plus the parts the chart owns (`server`, the
key file's `key_store`, Redis URLs and password variable). Redis URLs kept in a Secret
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
{{- if or $a.redis.urls (and $a.redis.existingSecret $a.redis.urlKey) }}
{{- $r := deepCopy ($c.redis | default dict) }}
{{- if $a.redis.urls }}
{{- $_ := set $r "urls" $a.redis.urls }}
{{- end }}
{{- /* With urlKey, the URLs come from the Secret as GYBC_AUTHZ__REDIS__URLS (deployment.yaml). */}}
{{- if $a.redis.cluster }}{{ $_ := set $r "cluster" true }}{{ end }}
{{- if $a.redis.username }}{{ $_ := set $r "username" $a.redis.username }}{{ end }}
{{- if and $a.redis.existingSecret $a.redis.passwordKey }}
{{- $_ := set $r "password_env" "GYBC_AUTHZ_REDIS_PASSWORD" }}
{{- end }}
{{- $_ := set $c "redis" $r }}
{{- end -}}
# gybc-authz configuration, rendered by the Helm chart from gybcAuthz.* values.
# Reference: README "Configuration reference"; check with `gybc-authz check-config FILE`.
{{ toYaml $c }}
{{- end }}
