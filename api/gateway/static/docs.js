// The API page: Swagger UI over this gateway's OpenAPI document. "Authorize" takes the API key
// (HTTP bearer); "Try it out" then calls the gateway from the browser.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
