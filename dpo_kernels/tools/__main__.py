"""``python -m dpo_kernels.tools`` lists the tools."""

print("python -m dpo_kernels.tools.compile_check   compile every kernel for sm_80/sm_90 and report resources")
