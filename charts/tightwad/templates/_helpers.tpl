{{/* The release's name for its objects: "tightwad" when the release is called so, else RELEASE-tightwad. */}}
{{- define "tightwad.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tightwad.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tightwad.labels" -}}
{{ include "tightwad.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tightwad.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tightwad.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tightwad.tokenSecret" -}}
{{- default (printf "%s-token" (include "tightwad.fullname" .)) .Values.token.existingSecret -}}
{{- end -}}

{{- define "tightwad.modelClaim" -}}
{{- default (printf "%s-models" (include "tightwad.fullname" .)) .Values.storage.pvc.existingClaim -}}
{{- end -}}

{{- define "tightwad.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
