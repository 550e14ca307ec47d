{{/* Names. */}}
{{- define "leash.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "leash.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "leash.selectorLabels" -}}
app.kubernetes.io/name: {{ include "leash.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "leash.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "leash.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: leash
{{- end -}}

{{- define "leash.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "leash.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "leash.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
A value as TOML: strings quoted (JSON string escapes are TOML basic-string
escapes), whole numbers as integers (Helm reads every YAML number as a
float), lists as arrays, maps as inline tables.
*/}}
{{- define "leash.toml" -}}
{{- $v := . -}}
{{- if kindIs "string" $v -}}
{{- $v | toJson -}}
{{- else if kindIs "bool" $v -}}
{{- $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- if eq (float64 $v) (float64 (int64 $v)) -}}{{- int64 $v -}}{{- else -}}{{- $v -}}{{- end -}}
{{- else if kindIs "slice" $v -}}
[{{- range $i, $e := $v -}}{{- if $i -}}, {{ end -}}{{- include "leash.toml" $e -}}{{- end -}}]
{{- else if kindIs "map" $v -}}
{ {{- $i := 0 -}}{{- range $k, $e := $v -}}{{- if $i -}}, {{ end -}}{{- $i = add1 $i -}}{{- $k | toJson }} = {{ include "leash.toml" $e -}}{{- end -}} }
{{- else -}}
{{- fail (printf "config: %v cannot be written as TOML" $v) -}}
{{- end -}}
{{- end -}}

{{/* The secret names the store's files come from (name, key, file). */}}
{{- define "leash.storeFiles" -}}
{{- $s := .Values.store -}}
{{- if $s.passwordSecret.name }}
- {{ dict "name" $s.passwordSecret.name "key" $s.passwordSecret.key "path" "password" | toJson }}
{{- end }}
{{- if $s.sentinel.passwordSecret.name }}
- {{ dict "name" $s.sentinel.passwordSecret.name "key" $s.sentinel.passwordSecret.key "path" "sentinel-password" | toJson }}
{{- end }}
{{- if $s.caSecret.name }}
- {{ dict "name" $s.caSecret.name "key" $s.caSecret.key "path" "ca.crt" | toJson }}
{{- end }}
{{- end -}}
