{{/* Labels every object of one component carries (the kustomize base's). */}}
{{- define "shepherd.labels" -}}
{app.kubernetes.io/name: {{ . }}, app.kubernetes.io/part-of: shepherd}
{{- end }}

{{/* "true" when the services hold certificates of their own (certificate or token client auth). */}}
{{- define "shepherd.ownCertificates" -}}
{{- if has .Values.tls.clientAuth (list "certificate" "token") }}true{{ end }}
{{- end }}

{{/* A service's in-cluster address: <name>.<namespace>.svc:<port>. */}}
{{- define "shepherd.address" -}}
{{ .name }}.{{ .root.Values.namespaces.services }}.svc:{{ (index .root.Values.services .name).port }}
{{- end }}
